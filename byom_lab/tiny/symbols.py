"""Symbol and pattern generators of the tiny suite: street digits, signs, textures, and real handwritten digits."""
import math

import torch

from .draw import (SIZE, band, by_class, colour, disk, finish, grid, paint, polygon, random_colour, rect,
                   ring, rotate, smooth_noise, uniform)

XX, YY = grid()

# 5x7 bitmap font for the digits 0-9, one string of 35 bits per digit (rows top to bottom).
_FONT_ROWS = [
    "01110 10001 10011 10101 11001 10001 01110", "00100 01100 00100 00100 00100 00100 01110",
    "01110 10001 00001 00010 00100 01000 11111", "11111 00010 00100 00010 00001 10001 01110",
    "00010 00110 01010 10010 11111 00010 00010", "11111 10000 11110 00001 00001 10001 01110",
    "00110 01000 10000 11110 10001 10001 01110", "11111 00001 00010 00100 01000 01000 01000",
    "01110 10001 10001 01110 10001 10001 01110", "01110 10001 10001 01111 00001 00010 01100",
]
FONT = torch.tensor([[[int(b) for b in row] for row in d.split()] for d in _FONT_ROWS], dtype=torch.float32)  # (10, 7, 5)


def glyph_mask(digits, x0, y0, cell_w, cell_h):
    """Mask (n, 1, H, W) of 5x7 font digits with top-left corner (x0, y0) and cell sizes."""
    col = torch.floor((XX - x0) / cell_w)
    row = torch.floor((YY - y0) / cell_h)
    inside = (col >= 0) & (col < 5) & (row >= 0) & (row < 7)
    flat = FONT.flatten(1)[digits]  # (n, 35)
    pos = (row.clamp(0, 6) * 5 + col.clamp(0, 4)).long().flatten(1)  # (n, H*W)
    return (torch.gather(flat, 1, pos).view(-1, 1, SIZE, SIZE) * inside).float()


def street_digits(labels, g):
    """SVHN-like: a coloured digit on clutter, with parts of neighbouring digits."""
    n = len(labels)
    cw, ch = uniform(n, .075, .09, g), uniform(n, .075, .095, g)
    x0 = .5 - 2.5 * cw + uniform(n, -.05, .05, g)
    y0 = .5 - 3.5 * ch + uniform(n, -.05, .05, g)
    bg = random_colour(n, g)
    img = bg * .7 + .3 * smooth_noise(n, 6, g, 3)
    fg = torch.where(bg.mean(1, keepdim=True) > .5, random_colour(n, g, 0, .35), random_colour(n, g, .65, 1))
    for shift in (-1, 1):
        other = torch.randint(0, 10, (n,), generator=g)
        img = paint(img, glyph_mask(other, x0 + shift * 7 * cw, y0, cw, ch), fg)
    img = paint(img, glyph_mask(labels, x0, y0, cw, ch), fg)
    return finish(img, .05, g)


def signs(labels, g):
    """GTSRB-like traffic signs on a cluttered background."""
    red, white, blue = (.8, .1, .1), (.95, .95, .95), (.1, .25, .7)
    black, yellow = (.05, .05, .05), (.95, .8, .1)

    def one(c, n, g):
        cx, cy = uniform(n, .4, .6, g), uniform(n, .4, .6, g)
        r = uniform(n, .28, .38, g)
        img = smooth_noise(n, 5, g, 3) * .6 + .2
        if c == 0:  # stop
            img = paint(img, polygon(XX, YY, cx, cy, r, 8, math.pi / 8), colour(red, n, .05, g))
            img = paint(img, rect(XX, YY, cx - .6 * r, cy - .12 * r, cx + .6 * r, cy + .12 * r), colour(white, n, .03, g))
        elif c in (1, 5):  # yield (pointing down), general caution (pointing up)
            rot = math.pi / 2 if c == 1 else -math.pi / 2
            img = paint(img, polygon(XX, YY, cx, cy, r, 3, rot), colour(red, n, .05, g))
            img = paint(img, polygon(XX, YY, cx, cy, .6 * r, 3, rot), colour(white, n, .03, g))
            if c == 5:
                img = paint(img, rect(XX, YY, cx - .06 * r, cy - .15 * r, cx + .06 * r, cy + .25 * r), colour(black, n, .02, g))
        elif c in (2, 3, 9):  # speed limit, no entry, no passing
            img = paint(img, disk(XX, YY, cx, cy, r), colour(red, n, .05, g))
            if c == 3:
                img = paint(img, rect(XX, YY, cx - .65 * r, cy - .15 * r, cx + .65 * r, cy + .15 * r), colour(white, n, .03, g))
            else:
                img = paint(img, disk(XX, YY, cx, cy, .75 * r), colour(white, n, .03, g))
                left, right = (black, black) if c == 2 else (red, black)
                img = paint(img, disk(XX, YY, cx - .3 * r, cy, .22 * r), colour(left, n, .03, g))
                img = paint(img, disk(XX, YY, cx + .3 * r, cy, .22 * r), colour(right, n, .03, g))
        elif c == 4:  # priority road
            img = paint(img, polygon(XX, YY, cx, cy, r, 4), colour(white, n, .03, g))
            img = paint(img, polygon(XX, YY, cx, cy, .7 * r, 4), colour(yellow, n, .05, g))
        elif c in (6, 8):  # roundabout, keep right
            img = paint(img, disk(XX, YY, cx, cy, r), colour(blue, n, .05, g))
            if c == 6:
                img = paint(img, ring(XX, YY, cx, cy, .35 * r, .6 * r), colour(white, n, .03, g))
            else:
                u, v = rotate(XX, YY, cx, cy, torch.full_like(cx, math.pi / 4))
                img = paint(img, band(v, 0, .12 * r) * (u.abs() < .6 * r).float(), colour(white, n, .03, g))
        elif c == 7:  # parking
            img = paint(img, polygon(XX, YY, cx, cy, r, 4, math.pi / 4), colour(blue, n, .05, g))
            img = paint(img, rect(XX, YY, cx - .3 * r, cy - .45 * r, cx - .1 * r, cy + .45 * r), colour(white, n, .03, g))
            img = paint(img, ring(XX, YY, cx, cy - .2 * r, .1 * r, .28 * r) * (XX > cx - .1 * r).float(), colour(white, n, .03, g))
        return finish(img * uniform(n, .6, 1.1, g), .04, g)
    return by_class(labels, g, one)


def textures(labels, g):
    """DTD-like two-colour procedural textures at random scale and orientation."""
    def one(c, n, g):
        u, v = rotate(XX, YY, .5, .5, uniform(n, 0, math.pi, g))
        f = uniform(n, 18, 32, g)
        if c == 0:  # striped
            m = torch.sin(u * f) > 0
        elif c == 1:  # dotted
            m = torch.sin(u * f) * torch.sin(v * f) > .5
        elif c == 2:  # checkered
            m = torch.sin(u * f * .6) * torch.sin(v * f * .6) > 0
        elif c == 3:  # zigzagged
            m = torch.sin(v * f + 2 * torch.abs(torch.remainder(u * f / 3, 2) - 1) * 3) > 0
        elif c == 4:  # grid
            m = (torch.sin(u * f) > .8) | (torch.sin(v * f) > .8)
        elif c == 5:  # wavy
            m = torch.sin(v * f + 1.5 * torch.sin(u * f / 3)) > 0
        elif c == 6:  # marbled
            m = torch.sin(u * f / 2 + 8 * smooth_noise(n, 4, g)) > 0
        elif c == 7:  # crosshatched
            m = (torch.sin((u + v) * f) > .7) | (torch.sin((u - v) * f) > .7)
        elif c == 8:  # spiralled
            rad = torch.sqrt((XX - .5) ** 2 + (YY - .5) ** 2)
            m = torch.sin(rad * f * 1.5 + torch.atan2(YY - .5, XX - .5) * 2) > 0
        else:  # blotchy
            m = smooth_noise(n, 5, g) > .55
        c1, c2 = random_colour(n, g), random_colour(n, g)
        return finish(paint(c2 * torch.ones(n, 3, SIZE, SIZE), m.float(), c1), .04, g)
    return by_class(labels, g, one)


def handwritten_digits():
    """scikit-learn's real 8x8 handwritten digits: (32x32 RGB images, labels, the raw 8x8 uint8 array)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    raw = torch.tensor(data.images).round().to(torch.uint8)  # (1797, 8, 8), values 0..16
    x = raw[:, None].float() / 16.0
    x = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (4, 4, 4, 4)).clamp(0, 1).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.tensor(data.target, dtype=torch.long), raw
