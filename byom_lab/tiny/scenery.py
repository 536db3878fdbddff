"""Scenery generators of the tiny suite: scenes, cars, aerial views and land cover.

One function per family, (labels, generator) -> images.

Each returns float images of shape (n, 3, 32, 32) in [0, 1]; everything random is drawn from
the given torch.Generator, so the same seed gives the same pixels.
"""
import math

import torch

from .draw import (SIZE, band, by_class, colour, disk, ellipse, finish, grid, paint, random_colour,
                   rect, ring, rotate, smooth_noise, uniform)

XX, YY = grid()


# --- scenes (SUN397-like) ------------------------------------------------------------------
# sky, ground, horizon height, decoration
_SCENES = [
    ((.55, .75, .95), (.90, .85, .60), .50, "water"),    # beach
    ((.60, .75, .85), (.10, .35, .10), .35, "trees"),    # forest
    ((.85, .80, .65), (.85, .65, .35), .45, "dunes"),    # desert
    ((.50, .65, .90), (.40, .40, .45), .75, "peak"),     # mountain
    ((.70, .70, .75), (.30, .30, .30), .80, "towers"),   # city
    ((.60, .80, .95), (.30, .60, .25), .40, "pond"),     # lake
    ((.75, .80, .90), (.95, .95, .97), .50, "none"),     # snowfield
    ((.95, .55, .30), (.25, .15, .20), .65, "sun"),      # sunset
    ((.55, .75, .95), (.45, .75, .30), .50, "flowers"),  # meadow
    ((.15, .12, .10), (.25, .20, .15), .50, "opening"),  # cave
]


def scenes(labels, g):
    def one(c, n, g):
        sky, ground, hz, deco = _SCENES[c]
        h = hz + uniform(n, -.08, .08, g)
        img = colour(sky, n, .06, g) * torch.ones(n, 3, SIZE, SIZE)
        if deco == "dunes":
            h = h + .05 * torch.sin(XX * uniform(n, 8, 14, g) + uniform(n, 0, 6.3, g))
        img = paint(img, (YY > h).float(), colour(ground, n, .06, g))
        if deco == "water":
            img = paint(img, ((YY > h) & (YY < h + uniform(n, .08, .16, g))).float(), colour((.2, .4, .8), n, .05, g))
        elif deco == "trees":
            trunks = (torch.sin(XX * uniform(n, 25, 40, g) + uniform(n, 0, 6.3, g)) > .3) & (YY > h - .25) & (YY < h + .1)
            img = paint(img, trunks.float(), colour((.05, .22, .05), n, .03, g))
        elif deco == "peak":
            cx = uniform(n, .3, .7, g)
            mountain = (YY > h - .5 + 1.3 * (XX - cx).abs()) & (YY <= h)
            img = paint(img, mountain.float(), colour((.45, .45, .5), n, .05, g))
            img = paint(img, (mountain & (YY < h - .38)).float(), colour((.97, .97, .97), n, .02, g))
        elif deco == "towers":
            tops = h - uniform(n, .1, .5, g) * (torch.sin(XX * 30 + uniform(n, 0, 6.3, g)) > 0).float() - .1
            img = paint(img, ((YY > tops) & (YY <= h)).float(), colour((.35, .35, .4), n, .08, g))
        elif deco == "pond":
            img = paint(img, ellipse(XX, YY, uniform(n, .35, .65, g), h + .25, uniform(n, .2, .3, g), .1), colour((.2, .4, .85), n, .05, g))
        elif deco == "sun":
            img = paint(img, disk(XX, YY, uniform(n, .25, .75, g), h - .05, uniform(n, .08, .14, g)), colour((1., .85, .3), n, .04, g))
        elif deco == "flowers":
            dots = (smooth_noise(n, 16, g) > .8) & (YY > h)
            img = paint(img, dots.float(), random_colour(n, g, .5, 1.))
        elif deco == "opening":
            img = paint(img, ellipse(XX, YY, uniform(n, .4, .6, g), uniform(n, .4, .6, g), uniform(n, .15, .25, g), uniform(n, .2, .3, g)),
                        colour((.85, .85, .75), n, .05, g))
        return finish(img, .04, g)
    return by_class(labels, g, one)


# --- cars (Stanford-Cars-like, fine-grained by silhouette) --------------------------------------
# body length, body height, cabin start, cabin length (fractions of body), cabin height, wheel radius
_CARS = [
    (.70, .14, .25, .45, .11, .070),  # sedan
    (.62, .13, .35, .35, .09, .070),  # coupe
    (.58, .15, .35, .55, .12, .070),  # hatchback
    (.74, .14, .20, .70, .12, .070),  # wagon
    (.70, .28, .00, .95, .00, .070),  # van
    (.74, .15, .05, .35, .13, .080),  # pickup
    (.86, .13, .20, .65, .10, .065),  # limousine
    (.60, .12, .45, .20, .07, .070),  # roadster
    (.56, .18, .15, .60, .15, .095),  # jeep
    (.80, .30, .00, .98, .00, .075),  # minibus
]


def cars(labels, g):
    def one(c, n, g):
        length, height, cab0, cabl, cabh, wheel = _CARS[c]
        s = uniform(n, .9, 1.1, g)
        L, H, R = length * s, height * s, wheel * s
        x0 = .5 - L / 2 + uniform(n, -.06, .06, g)
        ybase = uniform(n, .62, .72, g)
        img = random_colour(n, g, .3, .7) * .6 + smooth_noise(n, 4, g, 3) * .3
        paint_col = random_colour(n, g)
        img = paint(img, rect(XX, YY, x0, ybase - H, x0 + L, ybase), paint_col)
        cx0 = x0 + cab0 * L
        img = paint(img, rect(XX, YY, cx0, ybase - H - cabh * s, cx0 + cabl * L, ybase - H + .01), paint_col * .8)
        win = rect(XX, YY, cx0 + .02, ybase - H - cabh * s + .02, cx0 + cabl * L - .02, ybase - H - .01)
        img = paint(img, win, colour((.6, .8, .9), n, .05, g))
        for wx in (.2, .8):
            img = paint(img, disk(XX, YY, x0 + wx * L, ybase, R), colour((.08, .08, .08), n, .02, g))
        return finish(img, .03, g)
    return by_class(labels, g, one)


# --- aerial (RESISC45-like, top-down scenes) ----------------------------------------------------
def aerial(labels, g):
    def one(c, n, g):
        ang = uniform(n, 0, math.pi, g)
        u, v = rotate(XX, YY, .5, .5, ang)
        green = colour((.35, .5, .3), n, .05, g)
        grey = colour((.55, .55, .55), n, .04, g)
        img = green * torch.ones(n, 3, SIZE, SIZE) + .08 * (smooth_noise(n, 8, g) - .5)
        if c == 0:  # runway
            img = paint(img, band(v, 0, .12), grey)
            img = paint(img, band(v, 0, .015) * (torch.sin(u * 60) > 0).float(), colour((.95, .95, .95), n, .02, g))
        elif c == 1:  # roundabout
            img = paint(img, (band(u, 0, .05) + band(v, 0, .05) > 0).float(), grey)
            img = paint(img, ring(XX, YY, .5, .5, .14, .25), grey)
            img = paint(img, disk(XX, YY, .5, .5, .14), colour((.3, .6, .25), n, .05, g))
        elif c == 2:  # farmland
            img = paint(img, (torch.sin(u * uniform(n, 20, 35, g)) > 0).float(), colour((.6, .5, .3), n, .06, g))
        elif c == 3:  # harbor
            img = paint(img, (v > uniform(n, -.2, .1, g)).float(), colour((.15, .3, .6), n, .05, g))
            img = paint(img, (band(u, 0, .05) + band(u, .25, .04) > 0).float() * (v > -.1).float() * (v < .35).float(), grey)
        elif c == 4:  # parking lot
            img = grey * torch.ones_like(img)
            cars_ = (torch.sin(u * 45) > .2) & (torch.sin(v * 25) > .0)
            img = paint(img, cars_.float(), random_colour(n, g))
        elif c == 5:  # forest
            img = paint(img, (smooth_noise(n, 12, g) > .45).float(), colour((.1, .3, .1), n, .04, g))
        elif c == 6:  # freeway
            img = paint(img, (band(v, -.08, .05) + band(v, .08, .05) > 0).float(), grey)
        elif c == 7:  # stadium
            img = paint(img, ellipse(u, v, 0, 0, .38, .26), colour((.7, .35, .25), n, .05, g))
            img = paint(img, ellipse(u, v, 0, 0, .28, .16), colour((.25, .65, .25), n, .05, g))
        elif c == 8:  # desert
            img = colour((.85, .75, .55), n, .05, g) + .1 * (smooth_noise(n, 4, g) - .5)
        elif c == 9:  # residential
            houses = (smooth_noise(n, 10, g) > .62).float() * (torch.sin(u * 40) > -.3).float()
            img = paint(img, houses, colour((.7, .3, .25), n, .1, g))
        return finish(img, .03, g)
    return by_class(labels, g, one)


# --- land cover (EuroSAT-like, multispectral false colour) --------------------------------------
# palette low, palette high, noise cells, structure
_LAND = [
    ((.7, .6, .3), (.5, .7, .3), 8, "stripes"),   # annual crop
    ((.05, .25, .1), (.15, .4, .15), 16, ""),    # forest
    ((.4, .55, .25), (.6, .7, .35), 6, ""),       # herbaceous vegetation
    ((.35, .5, .3), (.45, .6, .35), 6, "road"),   # highway
    ((.5, .5, .55), (.85, .85, .9), 10, "blocks"),  # industrial
    ((.55, .75, .4), (.65, .85, .45), 3, ""),     # pasture
    ((.45, .35, .2), (.3, .55, .2), 10, "dots"),  # permanent crop
    ((.45, .4, .4), (.75, .45, .4), 12, "blocks"),  # residential
    ((.35, .55, .3), (.45, .6, .35), 5, "river"),  # river
    ((.05, .2, .45), (.1, .3, .55), 4, ""),       # sea
]


def landcover(labels, g):
    def one(c, n, g):
        lo, hi, cells, kind = _LAND[c]
        t = smooth_noise(n, cells, g)
        img = colour(lo, n, .05, g) * (1 - t) + colour(hi, n, .05, g) * t
        u, v = rotate(XX, YY, .5, .5, uniform(n, 0, math.pi, g))
        if kind == "stripes":
            img = paint(img, (torch.sin(u * uniform(n, 15, 25, g)) > .3).float(), colour(hi, n, .05, g) * .7)
        elif kind == "road":
            img = paint(img, band(v, uniform(n, -.2, .2, g), .04), colour((.6, .6, .6), n, .03, g))
        elif kind == "blocks":
            img = paint(img, ((torch.sin(u * 30) > 0) & (torch.sin(v * 30) > 0)).float() * (t > .4).float(), colour(hi, n, .05, g))
        elif kind == "dots":
            img = paint(img, ((torch.sin(u * 40) > .5) & (torch.sin(v * 40) > .5)).float(), colour((.15, .45, .1), n, .04, g))
        elif kind == "river":
            img = paint(img, band(v + .1 * torch.sin(u * uniform(n, 6, 12, g)), 0, .07), colour((.1, .25, .55), n, .04, g))
        return finish(img, .03, g)
    return by_class(labels, g, one)
