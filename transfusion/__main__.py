import sys

from transfusion.cli import main

sys.exit(main())
