"""cmi_jax: Contrastive Model Inversion (CMI, IJCAI 2021) for data-free KD in JAX/Flax."""

__version__ = '0.1.0'
