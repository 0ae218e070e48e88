"""Plain-PyTorch reference ops: the oracle every backend is tested against, and the CPU path.

Each module registers its forward/backward pair as the ``"torch"`` backend of its op.
"""
from .. import dispatch
from .attention import attention_backward, attention_forward
from .contrastive import infonce_backward, infonce_forward
from .gated import gated_backward, gated_forward
from .lora import lora_linear_backward, lora_linear_forward
from .pooling import pool_backward, pool_forward
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rotary import rotary_backward, rotary_forward

dispatch.register("flash_attention", "torch", attention_forward, attention_backward)
dispatch.register("pool", "torch", pool_forward, pool_backward)
dispatch.register("contrastive_loss", "torch", infonce_forward, infonce_backward)
dispatch.register("rms_norm", "torch", rms_norm_forward, rms_norm_backward)
dispatch.register("gated_activation", "torch", gated_forward, gated_backward)
dispatch.register("rotary_embedding", "torch", rotary_forward, rotary_backward)
dispatch.register("lora_linear", "torch", lora_linear_forward, lora_linear_backward)
