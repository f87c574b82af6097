"""The LayerCAM measure where the truth is known: synth_dme's recorded lesion circle holds the exudates it drew
(and recording it changes no pixel), the circle lands on the model input through the crop, and the pointing game
and energy share on known maps, against a uniform map."""
import numpy as np
import pytest

from tltrain.data.synth import _rng
from tltrain.data.synth_dme import render_dme
from tltrain.explain.pointing import circle_mask, lesion_mask, scores


@pytest.mark.parametrize("index", range(6))
def test_the_recorded_lesion_circle_holds_the_near_exudates(index):
    seed = _rng(1, index, 1, 0xD3E)
    truth: dict = {}
    image = render_dme(seed, 1, 192, truth)
    assert np.array_equal(image, render_dme(_rng(1, index, 1, 0xD3E), 1, 192))  # recording draws nothing
    plain = render_dme(_rng(1, index, 0, 0xD3E), 0, 192)  # class 0: no exudate near the macula
    yellow = (image[..., 0] > 150) & (image[..., 1] > 120) & (image[..., 2] < 110)
    height, width = yellow.shape
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    inside = (xx - truth["macula"][0]) ** 2 + (yy - truth["macula"][1]) ** 2 <= truth["lesion_radius"] ** 2
    distance = np.sqrt((xx - truth["macula"][0]) ** 2 + (yy - truth["macula"][1]) ** 2)
    # the ring beyond the circle (plus 2 px of blur) up to 0.33 R, short of the far exudates (0.45-0.9 R) and the
    # yellowish optic disc (about 0.46 R from the macula): empty
    ring = (distance > truth["lesion_radius"] + 2) & (distance < 0.33 * truth["radius"])
    assert yellow[inside].sum() > 0  # the exudates are where the record says
    assert yellow[ring].sum() == 0
    assert plain.shape == image.shape


def test_the_circle_moves_through_the_crop_and_the_scores_of_known_maps():
    box, size = (20, -10, 200), 100  # photo square of side 200 at (20, -10) -> 100 px input
    mask = lesion_mask({"macula": (120.0, 90.0), "lesion_radius": 20.0}, box, size)
    expected = circle_mask(size, 50.0, 50.0, 10.0)
    assert np.array_equal(mask, expected) and abs(mask.mean() - np.pi * 100 / 100 ** 2) < 0.01
    heat = np.zeros((size, size), np.float32)
    heat[50, 50] = 1.0
    assert scores(heat, mask) == (True, 1.0)
    heat[5, 5] = 3.0  # a stronger peak elsewhere: the game is lost, a quarter of the energy inside
    hit, share = scores(heat, mask)
    assert not hit and share == pytest.approx(0.25)
    uniform = np.ones((size, size), np.float32)
    assert scores(uniform, mask)[1] == pytest.approx(mask.mean())
    assert scores(np.zeros((size, size)), mask) == (False, 0.0)
