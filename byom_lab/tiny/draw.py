"""Vectorised drawing primitives for generated 32x32 RGB images (batch-first, values in [0, 1])."""
import math

import torch

SIZE = 32


def grid(size: int = SIZE):
    """Pixel-centre coordinates in [0, 1): two tensors of shape (1, 1, size, size)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx[None, None], yy[None, None]


def uniform(n: int, lo: float, hi: float, g: torch.Generator):
    """Per-sample uniform scalars, shape (n, 1, 1, 1)."""
    return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)


def colour(base, n: int, jitter: float, g: torch.Generator):
    """A base RGB colour (3,) or (n, 3) jittered per sample, shape (n, 3, 1, 1)."""
    base = torch.as_tensor(base, dtype=torch.float32).expand(n, 3)
    return (base + jitter * torch.randn(n, 3, generator=g)).clamp(0, 1)[..., None, None]


def random_colour(n: int, g: torch.Generator, lo: float = 0.0, hi: float = 1.0):
    """Uniformly random RGB colours, shape (n, 3, 1, 1)."""
    return lo + (hi - lo) * torch.rand(n, 3, 1, 1, generator=g)


def rotate(xx, yy, cx, cy, angle):
    """Coordinates relative to (cx, cy), rotated by -angle (radians)."""
    dx, dy = xx - cx, yy - cy
    c, s = torch.cos(angle), torch.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def disk(xx, yy, cx, cy, r):
    return ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).float()


def ellipse(xx, yy, cx, cy, rx, ry):
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1).float()


def ring(xx, yy, cx, cy, r_in, r_out):
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    return ((d2 < r_out**2) & (d2 >= r_in**2)).float()


def rect(xx, yy, x0, y0, x1, y1):
    return ((xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)).float()


def band(u, centre, half_width):
    """A straight band |u - centre| < half_width along rotated coordinate u."""
    return ((u - centre).abs() < half_width).float()


def polygon(xx, yy, cx, cy, radius, sides: int, rot=0.0):
    """Filled regular polygon with `sides` vertices."""
    dx, dy = xx - cx, yy - cy
    theta = torch.atan2(dy, dx) - rot
    sector = 2 * math.pi / sides
    local = torch.remainder(theta, sector) - sector / 2
    dist = torch.sqrt(dx**2 + dy**2)
    return (dist * torch.cos(local) < radius * math.cos(math.pi / sides)).float()


def smooth_noise(n: int, cells: int, g: torch.Generator, channels: int = 1, size: int = SIZE):
    """Bilinearly upsampled uniform noise on a cells x cells lattice, shape (n, channels, size, size)."""
    low = torch.rand(n, channels, cells, cells, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def paint(img, mask, col):
    """Alpha-composite colour `col` (n, 3, 1, 1) onto img where mask (n, 1, H, W) is 1."""
    return img * (1 - mask) + col * mask


def finish(img, noise: float, g: torch.Generator):
    """Add pixel noise and clamp to [0, 1]."""
    return (img + noise * torch.randn(img.shape, generator=g)).clamp(0, 1)


def by_class(labels, g, draw_one_class):
    """Call draw_one_class(c, n, g) for each class present and scatter results back."""
    out = torch.empty(len(labels), 3, SIZE, SIZE)
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        out[idx] = draw_one_class(c, len(idx), g)
    return out
