"""Index helpers for the packed (varlen) layout."""
import torch


def token_positions(cu_seqlens: torch.Tensor, total: int):
    """For a packed batch: (seq_id, pos_in_seq, lengths), each a LongTensor."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[:-1][seq_id]
    return seq_id, pos, lengths
