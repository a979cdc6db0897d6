"""The section-3 roofline: per-layer figures of a hand-checked network, the sweep, the CLI."""

import csv

import keras
import pytest

from mnv4_train import roofline
from mnv4_train.models import profile


def _tiny_net():
  """8x8x3 -> conv 3x3 s2 (4) -> dw 3x3 -> dense on the map (6) -> grouped dw 3x3 -> pool -> fc 2."""
  x = inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="conv")(x)
  x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
  x = keras.layers.BatchNormalization(name="bn")(x)  # free: folded at inference
  x = keras.layers.Dense(6, name="pw")(x)
  x = keras.layers.Conv2D(6, 3, padding="same", groups=6, use_bias=False, name="gdw")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))


# Counted by hand, 1 byte per element. The conv's output is 4x4x4 = 64 elements.
#          kind       MACs             weights       activations (in + out)
HAND = {
    "conv": ("conv", 64 * 27, 3 * 3 * 3 * 4, 8 * 8 * 3 + 64),
    "dw": ("dwconv", 64 * 9, 3 * 3 * 4, 64 + 64),
    "pw": ("dense", 96 * 4, 4 * 6 + 6, 64 + 96),        # a dense layer on a map is a 1x1 conv
    "gdw": ("dwconv", 96 * 9, 3 * 3 * 6, 96 + 96),      # groups == channels: depthwise
    "fc": ("dense", 6 * 2, 6 * 2 + 2, 6 + 2),
}


def test_per_layer_figures_of_a_hand_checked_network():
  layers = roofline.roof_layers(profile.layer_costs(_tiny_net(), 8))
  assert [l.path for l in layers] == list(HAND)
  for layer in layers:
    kind, macs, weights, acts = HAND[layer.path]
    assert (layer.kind, layer.macs, layer.weight_bytes, layer.activation_bytes) == (
        kind, macs, weights, acts), layer.path
    assert layer.intensity == pytest.approx(macs / (weights + acts))
  assert layers[0].intensity == pytest.approx(1728 / 364)
  # float32: four bytes per element, a quarter of the intensity.
  wide = roofline.roof_layers(profile.layer_costs(_tiny_net(), 8), bytes_per_elem=4)
  assert wide[0].weight_bytes == 432 and wide[0].activation_bytes == 1024


def test_model_time_is_the_sum_of_per_layer_maxima():
  layers = roofline.roof_layers(profile.layer_costs(_tiny_net(), 8))
  # RP 0: unlimited bandwidth, time = MACs.
  assert roofline.model_time(layers, 0) == 1728 + 576 + 384 + 864 + 12
  # RP 4: only the first conv (intensity 4.75) is still compute bound.
  assert roofline.model_time(layers, 4) == 1728 + 4 * 164 + 4 * 190 + 4 * 246 + 4 * 22
  # RP 10: every layer is memory bound, time = RP x bytes.
  assert roofline.model_time(layers, 10) == 10 * (364 + 164 + 190 + 246 + 22)


def test_roofline_model_must_take_the_resolution_asked_for():
  with pytest.raises(ValueError, match="8x8"):
    profile.layer_costs(_tiny_net(), 16)


def test_cli_writes_csvs_and_png(tmp_path, capsys):
  out = tmp_path / "roof"
  assert roofline.main(["--out", str(out), "--models", "conv_s,mobilenet_v2"]) == 0
  png = (out / "roofline.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
  with open(out / "roofline_sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [float(r["ridge_point_macs_per_byte"]) for r in rows] == list(roofline.RIDGE_POINTS)
  conv_s = [float(r["conv_s_mac_equivalents"]) for r in rows]
  assert conv_s[0] == pytest.approx(186.0e6, rel=1e-3)  # RP 0: the MAC count
  assert all(b > a for a, b in zip(conv_s, conv_s[1:]))  # memory-bound layers grow with RP
  mnv2_rp0 = float(rows[0]["mobilenet_v2_mac_equivalents"])
  assert mnv2_rp0 == pytest.approx(300.8e6, rel=1e-3)  # MobileNetV2's published 300M MACs
  with open(out / "roofline_layers.csv") as f:
    layers = list(csv.DictReader(f))
  conv_s_layers = [l for l in layers if l["model"] == "conv_s"]
  assert sum(int(l["macs"]) for l in conv_s_layers) == int(conv_s[0])
  assert sum(float(l["time_share_rp500"]) for l in conv_s_layers) == pytest.approx(1, abs=1e-3)
  assert conv_s_layers[-1]["path"] == "logits" and conv_s_layers[-1]["kind"] == "dense"
  table = capsys.readouterr().out
  assert "MNv4-Conv-S" in table and "MobileNetV2" in table


def test_cli_unknown_model_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    roofline.main(["--out", str(tmp_path / "r"), "--models", "conv_s,resnet50"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "resnet50" in err[0] and "mobilenet_v2" in err[0]
  assert not (tmp_path / "r").exists()
