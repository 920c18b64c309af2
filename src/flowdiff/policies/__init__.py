"""Policies: flow matching of robot action chunks conditioned on observations (pi-0's action expert, Diffusion
Policy), their demonstrations, environments and rollout evaluation."""
