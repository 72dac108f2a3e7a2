"""transfusion-kernels: fused kernels for Transfusion-style multimodal models.

Every op has a readable PyTorch ``reference`` backend and fast ``triton`` / ``cuda`` backends,
chosen per call (``backend=``), per block and thread (``use_backend``) or per process
(``TRANSFUSION_KERNELS_BACKEND``). A named backend runs or raises ``BackendUnavailableError``;
``"auto"`` chooses, and ``explain`` says what it chose and why.
"""

from transfusion_kernels.backends import (
    BackendUnavailableError,
    available_backends,
    explain,
    use_backend,
)
from transfusion_kernels.masks import HybridMask
from transfusion_kernels.attention import flex_attention, hybrid_attention
from transfusion_kernels.timestep import TimestepMLP, patch_timestep_embedding, timestep_embedding
from transfusion_kernels.diffusion import (
    DiffusionSchedule,
    add_noise,
    ddim_step,
    ddpm_step,
    diffusion_loss,
)
from transfusion_kernels.flow import FlowMatchSchedule, flow_add_noise, flow_euler_step, flow_loss

__version__ = "0.1.0"


def build_info() -> dict:
    """How this install was built: ``version``, ``commit`` (None when unknown) and
    ``cuda_extension``: ``{"built": True, "archs", "cuda_version", ...}`` from the loaded module, or
    ``{"built": False, "reason"}`` saying why it is missing or does not load, and the fix."""
    from transfusion_kernels import backends

    record = backends.build_record()
    ext, err = backends.load_extension()
    if ext is None:
        cuda = {"built": False, "reason": err}
    else:
        compiled = dict(ext.build_info())
        cuda = {
            "built": True,
            "archs": list(compiled["archs"]),
            "cuda_version": compiled["nvcc_version"],
            "source_hash": compiled["source_hash"],
            "file": ext.__file__,
        }
    return {"version": __version__, "commit": record.get("commit"), "cuda_extension": cuda}


__all__ = [
    "BackendUnavailableError",
    "DiffusionSchedule",
    "FlowMatchSchedule",
    "HybridMask",
    "TimestepMLP",
    "add_noise",
    "available_backends",
    "build_info",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "explain",
    "flow_add_noise",
    "flow_euler_step",
    "flex_attention",
    "flow_loss",
    "hybrid_attention",
    "patch_timestep_embedding",
    "timestep_embedding",
    "use_backend",
]
