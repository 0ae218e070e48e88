"""L2 normalisation x / max(|x|, eps) and its gradient, shared by pooling and the contrastive loss."""
import torch

NORM_EPS = 1e-12


def l2_normalized(x: torch.Tensor):
    """(x / max(|x|, eps) in float32, the clamped norm (rows, 1)). A zero row stays zero."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def l2_normalize_backward(grad_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through x -> x / max(|x|, eps): the radial part is projected out where |x| > eps."""
    radial = unit * (unit * grad_unit).sum(dim=-1, keepdim=True)
    return torch.where(norm > NORM_EPS, grad_unit - radial, grad_unit) / norm
