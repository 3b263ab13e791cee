"""A small denoiser network for checking Jacobian products against a dense Jacobian."""

import torch
from torch import nn


class TinyDenoiser(nn.Module):
    """Convolution, group norm, self-attention and a sigma embedding: the layer types of a diffusion UNet."""

    def __init__(self, channels: int = 3, width: int = 8, fused_attention: bool = False):
        super().__init__()
        self.fused_attention = fused_attention
        self.embed = nn.Linear(1, width)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        # In eval mode without autograd, nn.MultiheadAttention takes a fused
        # kernel that has no forward-mode AD, like the fused SDPA kernels of
        # real models. The explicit path below supports every AD mode.
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fused_attention:
            return self.attention(tokens, tokens, tokens, need_weights=False)[0]
        query, key, value = nn.functional.linear(tokens, self.attention.in_proj_weight, self.attention.in_proj_bias).chunk(3, dim=-1)
        weights = torch.softmax(query @ key.transpose(1, 2) / query.shape[-1] ** 0.5, dim=-1)
        return self.attention.out_proj(weights @ value)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / torch.sqrt(1.0 + sigma**2).view(-1, 1, 1, 1)
        h = self.conv_in(x * scale) + self.embed(sigma.log().view(-1, 1).to(x.dtype))[:, :, None, None]
        h = nn.functional.silu(self.norm(h))
        tokens = h.flatten(2).transpose(1, 2)
        attended = self.attend(tokens)
        h = h + attended.transpose(1, 2).reshape(h.shape)
        noise = self.conv_out(h)
        return x - sigma.view(-1, 1, 1, 1) * noise


def build_denoiser(seed: int, dtype: torch.dtype = torch.float32, fused_attention: bool = False) -> TinyDenoiser:
    torch.manual_seed(seed)
    return TinyDenoiser(fused_attention=fused_attention).to(dtype).eval()


def dense_jacobian(model: nn.Module, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Full Jacobian [n, n] of the flattened output by reverse mode, outside inference mode."""
    sigmas = torch.full((1,), sigma, dtype=x.dtype)

    def flat_output(flat_input: torch.Tensor) -> torch.Tensor:
        return model(flat_input.reshape(x.shape), sigmas).reshape(-1)

    return torch.autograd.functional.jacobian(flat_output, x.reshape(-1))
