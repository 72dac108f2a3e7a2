"""Importing the package changes nothing in diffusers, transformers or torch; the integrations act
only through their explicit, undoable calls (README, "Drop-in integrations")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a fresh process: snapshot diffusers', transformers' and torch's state, import every module of
# the package, snapshot again. Printed as JSON: {"before": ..., "after": ..., "imported": [...]}.
PROBE = r"""
import importlib, json, pkgutil, sys
import torch
import torch.nn.functional as F
import diffusers
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

def snapshot():
    def ident(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}:{id(obj)}"
    torch_fns = {name: ident(getattr(F, name)) for name in dir(F) if callable(getattr(F, name))}
    torch_fns.update({name: ident(getattr(torch, name)) for name in ("matmul", "softmax", "compile")})
    torch_fns.update({name: ident(getattr(torch.Tensor, name)) for name in ("__matmul__", "softmax", "to")})
    return {
        "DDIMPipeline.__init__": ident(diffusers.DDIMPipeline.__init__),
        "DDPMPipeline.__init__": ident(diffusers.DDPMPipeline.__init__),
        "attention": {k: ident(ALL_ATTENTION_FUNCTIONS[k]) for k in ALL_ATTENTION_FUNCTIONS},
        "attention_global": sorted(AttentionInterface._global_mapping),
        "mask": {k: ident(ALL_MASK_ATTENTION_FUNCTIONS[k]) for k in ALL_MASK_ATTENTION_FUNCTIONS},
        "mask_global": sorted(AttentionMaskInterface._global_mapping),
        "torch_functions": torch_fns,
        "default_dtype": str(torch.get_default_dtype()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "rng": torch.random.get_rng_state().sum().item(),
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "sdp": [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled()],
    }

before = snapshot()
import transfusion_kernels
names = ["transfusion_kernels"] + [m.name for m in pkgutil.walk_packages(transfusion_kernels.__path__, "transfusion_kernels.")]
for name in names:
    importlib.import_module(name)
after = snapshot()
print(json.dumps({"before": before, "after": after, "imported": names}))
"""


@pytest.fixture(scope="module")
def probe():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_importing_every_module_changes_nothing(probe):
    assert "transfusion_kernels.integrations.diffusers" in probe["imported"]
    assert "transfusion_kernels.integrations.transformers" in probe["imported"]
    for key, before in probe["before"].items():
        assert probe["after"][key] == before, f"importing the package changed {key}"


def test_import_is_lazy():
    """``import transfusion_kernels`` imports neither triton nor torch._dynamo (seconds each)."""
    code = (
        "import sys, torch, transfusion_kernels; "
        "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"


def test_transformers_register_returns_its_name_and_unregister_undoes_it():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from transfusion_kernels.integrations import transformers as tk_hf

    attention, masks = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    name = tk_hf.register("tk_test_name")
    assert name == "tk_test_name" and tk_hf.register(name) == name  # idempotent
    assert ALL_ATTENTION_FUNCTIONS[name] is tk_hf.transfusion_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is tk_hf.transfusion_mask_interface
    tk_hf.unregister(name)
    assert name not in ALL_ATTENTION_FUNCTIONS and name not in ALL_MASK_ATTENTION_FUNCTIONS
    assert AttentionInterface._global_mapping == attention and AttentionMaskInterface._global_mapping == masks

    # Over an existing name, unregister puts the previous function back.
    tk_hf.register("sdpa")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is tk_hf.transfusion_attention_forward
    tk_hf.unregister("sdpa")
    assert AttentionInterface._global_mapping == attention and AttentionMaskInterface._global_mapping == masks
