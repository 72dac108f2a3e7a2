"""Drop-ins for the Hugging Face ecosystem; each module imports its library only when used.

- ``transfusion_kernels.integrations.diffusers``: ``FusedDDPMScheduler`` and ``FusedDDIMScheduler``,
  diffusers schedulers whose ``step`` and ``add_noise`` run the fused diffusion kernels.
- ``transfusion_kernels.integrations.transformers``: the hybrid attention as a transformers
  attention implementation.
"""
