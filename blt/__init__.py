"""blt: a from-scratch Byte Latent Transformer (Pagnoni et al. 2024, arXiv:2412.09871)."""
