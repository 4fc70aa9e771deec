from common.kernels.flash_attention import flash_attn_varlen, paged_latent_decode

__all__ = ["flash_attn_varlen", "paged_latent_decode"]
