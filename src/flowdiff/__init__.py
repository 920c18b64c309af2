"""flowdiff: flow matching and diffusion models, following MIT 6.S184 (arXiv 2506.02070).

Time runs from t = 0 (noise) to t = 1 (data): ``x_t = alpha_t z + beta_t eps``.
The math modules (paths, objectives, couplings, samplers, guidance, dynamics,
densities) are plain PyTorch and import neither Lightning nor Hydra.
"""

__version__ = "0.1.0"
