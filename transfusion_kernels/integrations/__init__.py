"""Drop-ins for the Hugging Face ecosystem. Importing them changes nothing in diffusers or
transformers; each acts only through an explicit call that can be undone.

- ``transfusion_kernels.integrations.diffusers``: ``FusedDDPMScheduler``, ``FusedDDIMScheduler`` and
  ``FusedFlowMatchEulerDiscreteScheduler``, diffusers schedulers whose ``step`` and ``add_noise``
  run the fused kernels; set one with ``pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)``.
- ``transfusion_kernels.integrations.transformers``: the hybrid attention as a transformers
  attention implementation: ``model.set_attn_implementation(register())``; ``unregister()``.
"""
