"""Public ops: input validation, one dispatch point, and one autograd-aware torch custom op each."""
from .attention import flash_attention
from .contrastive import contrastive_loss
from .gated import gated_activation
from .lora import lora_linear
from .pooling import pool
from .normalization import rms_norm
from .rotary import rotary_embedding

__all__ = ["flash_attention", "pool", "contrastive_loss", "rms_norm", "gated_activation", "rotary_embedding",
           "lora_linear"]
