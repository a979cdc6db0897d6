"""The roofline analysis of the paper's section 3: model time across hardware ridge points.

    python -m mnv4_train.roofline --out roofline/
    python -m mnv4_train.roofline --out roofline/ --models conv_s,hybrid_m,mobilenet_v2

Each layer i with MACs_i, weight bytes W_i and activation bytes A_i (what it reads and writes,
from `mnv4_train.models.profile`) takes, on hardware with peak compute PeakMACs and memory
bandwidth PeakMemBW,

    LayerTime_i = max(MACs_i / PeakMACs, (W_i + A_i) / PeakMemBW)

since compute and memory traffic overlap and the slower one bounds the layer; ModelTime is the
sum over layers. Hardware enters only through its ridge point RP = PeakMACs / PeakMemBW (the
operational intensity, MACs per byte, at which a layer stops being memory bound). Holding
PeakMACs at 1 and sweeping RP from 0 (unlimited bandwidth: time = MACs) to 500 MACs/byte, as the
paper does, gives ModelTime(RP) = sum_i max(MACs_i, RP * (W_i + A_i)) in MAC-equivalents: at
RP 0 a model's time is its MAC count; the more of its layers are memory bound, the faster it
grows with RP.

Written to `--out`: `roofline.png` (model time against RP, absolute and relative to a
baseline; top-1 against model time at low and high RP like the paper's figure 2; one model's
per-layer time at RP 0 and 500 like figure 3), `roofline_sweep.csv` (model time of every model
at every RP) and `roofline_layers.csv` (per layer: MACs, weight and activation bytes,
operational intensity). A table goes to stdout.

Models: the five MNv4 variants (our builder) and, as baselines, MobileNetV1, MobileNetV2,
MobileNetV3-Large and ConvNeXt-Tiny from `keras.applications` built without weights (nothing is
downloaded); all at their canonical resolution, all counted by the same profiler (convs,
depthwise convs, dense layers, attention matmuls; BatchNorm folded, elementwise ops free).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import tempfile
from typing import Callable, Sequence

from mnv4_train.cli import quiet_tensorflow
from mnv4_train.errors import ArgumentParser, ConfigError, InputPathError, exit_on_user_error, run_then_exit

RIDGE_POINTS = tuple(range(0, 501, 5))  # MACs per byte, the paper's sweep
BYTES_PER_ELEM = 1  # int8 weights and activations, as the paper deploys to CPUs and EdgeTPUs
REPORT_POINTS = (0, 50, 100, 200, 500)


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A reference network from keras.applications, built without weights."""
  paper_name: str
  resolution: int
  factory: str  # attribute of keras.applications
  top1: float   # ImageNet top-1 the paper (or the model's own paper) reports


BASELINES = {
    # Top-1: the MobileNetV4 paper's retrained MobileNets; ConvNeXt-T from its own paper.
    "mobilenet_v1": Baseline("MobileNetV1", 224, "MobileNet", 74.0),
    "mobilenet_v2": Baseline("MobileNetV2", 224, "MobileNetV2", 73.4),
    "mobilenet_v3_large": Baseline("MobileNetV3-L", 224, "MobileNetV3Large", 75.5),
    "convnext_tiny": Baseline("ConvNeXt-T", 224, "ConvNeXtTiny", 82.1),
}
REFERENCE = "mobilenet_v2"  # the relative panel divides by this model's time at each RP


def model_names() -> tuple[str, ...]:
  from mnv4_train.models import MODEL_NAMES
  return MODEL_NAMES + tuple(BASELINES)


@dataclasses.dataclass(frozen=True)
class LayerRoof:
  """One MAC-bearing op under the roofline model (bytes at the chosen element size)."""
  path: str
  kind: str
  macs: int
  weight_bytes: int
  activation_bytes: int

  @property
  def bytes(self) -> int:
    return self.weight_bytes + self.activation_bytes

  @property
  def intensity(self) -> float:
    """Operational intensity, MACs per byte moved."""
    return self.macs / self.bytes if self.bytes else float("inf")

  def time(self, ridge_point: float) -> float:
    """Layer time in MAC-equivalents (PeakMACs = 1, PeakMemBW = 1 / ridge_point)."""
    return max(float(self.macs), ridge_point * self.bytes)


def roof_layers(costs, *, bytes_per_elem: int = BYTES_PER_ELEM) -> list[LayerRoof]:
  """`profile.LayerCost`s as roofline layers at `bytes_per_elem` bytes per weight/activation."""
  return [LayerRoof(c.path, c.kind, c.macs, c.weights * bytes_per_elem,
                    c.activation_bytes(bytes_per_elem)) for c in costs]


def model_time(layers: Sequence[LayerRoof], ridge_point: float) -> float:
  """The paper's ModelTime: the sum of per-layer roofline times, in MAC-equivalents."""
  return sum(layer.time(ridge_point) for layer in layers)


def build_model(name: str):
  """(keras model with a fixed input size, resolution, paper name, top-1) for a roofline name."""
  import keras

  from mnv4_train import models
  if name in BASELINES:
    b = BASELINES[name]
    factory: Callable = getattr(keras.applications, b.factory)
    model = factory(weights=None, input_shape=(b.resolution, b.resolution, 3), classes=1000)
    return model, b.resolution, b.paper_name, b.top1
  spec = models.get_spec(name)
  model = models.build(name, num_classes=1000, resolution=spec.resolution)
  return model, spec.resolution, spec.paper_name, spec.paper_top1


def analyse(names: Sequence[str], *, bytes_per_elem: int = BYTES_PER_ELEM) -> dict:
  """Per model: its roofline layers, resolution, paper name and top-1."""
  from mnv4_train.models import profile
  out = {}
  for name in names:
    model, res, paper_name, top1 = build_model(name)
    out[name] = dict(layers=roof_layers(profile.layer_costs(model, res),
                                        bytes_per_elem=bytes_per_elem),
                     resolution=res, paper_name=paper_name, top1=top1)
  return out


def _check_names(names: Sequence[str]) -> None:
  valid = model_names()
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ConfigError(f"unknown model {', '.join(map(repr, unknown))} in --models; choose from: "
                      f"{', '.join(valid)}")
  if not names:
    raise ConfigError("--models is empty; name at least one model")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Writes through a temporary file in the same folder, renamed into place when complete."""
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs are ordinary files
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_csvs(results: dict, out_dir: str, ridge_points: Sequence[float]) -> tuple[str, str]:
  sweep_path = os.path.join(out_dir, "roofline_sweep.csv")
  layers_path = os.path.join(out_dir, "roofline_layers.csv")
  names = list(results)

  def write_sweep(path):
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["ridge_point_macs_per_byte"] + [f"{n}_mac_equivalents" for n in names])
      for rp in ridge_points:
        w.writerow([rp] + [f"{model_time(results[n]['layers'], rp):.0f}" for n in names])

  def write_layers(path):
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["model", "index", "path", "kind", "macs", "weight_bytes", "activation_bytes",
                  "intensity_macs_per_byte", "time_share_rp0", "time_share_rp500"])
      for n in names:
        layers = results[n]["layers"]
        t0, t500 = model_time(layers, 0), model_time(layers, 500)
        for i, l in enumerate(layers):
          w.writerow([n, i, l.path, l.kind, l.macs, l.weight_bytes, l.activation_bytes,
                      f"{l.intensity:.3f}", f"{l.time(0) / t0:.5f}", f"{l.time(500) / t500:.5f}"])

  _atomic_write(sweep_path, write_sweep)
  _atomic_write(layers_path, write_layers)
  return sweep_path, layers_path


def plot(results: dict, path: str, ridge_points: Sequence[float], *, detail: str,
         bytes_per_elem: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  names = list(results)
  rps = np.asarray(ridge_points, dtype=float)
  times = {n: np.array([model_time(results[n]["layers"], rp) for rp in rps]) for n in names}
  style = lambda n: dict(lw=2.2 if n not in BASELINES else 1.4,
                         ls="-" if n not in BASELINES else "--")
  label = lambda n: results[n]["paper_name"]
  fig, axes = plt.subplots(2, 2, figsize=(14, 10))

  ax = axes[0, 0]
  for n in names:
    ax.plot(rps, times[n] / 1e9, label=label(n), **style(n))
  ax.set_yscale("log")
  ax.set_xlabel("ridge point (MACs/byte)")
  ax.set_ylabel("model time (G MAC-equivalents; = GMACs at RP 0)")
  ax.set_title("Roofline model time, PeakMACs held fixed")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)

  ax = axes[0, 1]
  ref = REFERENCE if REFERENCE in names else names[0]
  for n in names:
    ax.plot(rps, times[n] / times[ref], label=label(n), **style(n))
  ax.set_yscale("log")
  ax.set_xlabel("ridge point (MACs/byte)")
  ax.set_ylabel(f"model time / {label(ref)} at the same RP")
  ax.set_title(f"Relative to {label(ref)}")
  ax.grid(alpha=0.3)

  ax = axes[1, 0]
  lo, hi = rps[0], rps[-1]
  for n in names:
    top1 = results[n]["top1"]
    if top1 is None:
      continue
    t = [model_time(results[n]["layers"], rp) / times[ref][i] for i, rp in ((0, lo), (-1, hi))]
    ax.plot(t, [top1, top1], color="0.7", lw=0.8, zorder=1)
    ax.scatter(t[0], top1, marker="o", color="tab:blue", zorder=2)
    ax.scatter(t[1], top1, marker="s", color="tab:red", zorder=2)
    ax.annotate(label(n), (t[0], top1), fontsize=7, xytext=(4, 3), textcoords="offset points")
  ax.scatter([], [], marker="o", color="tab:blue", label=f"RP {lo:g} (compute bound, CPU-like)")
  ax.scatter([], [], marker="s", color="tab:red", label=f"RP {hi:g} (memory bound, accelerator)")
  ax.set_xscale("log")
  ax.set_xlabel(f"model time / {label(ref)} at the same RP")
  ax.set_ylabel("ImageNet top-1 (%, as published)")
  ax.set_title("Accuracy against roofline time at both ends of the sweep")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)

  ax = axes[1, 1]
  layers = results[detail]["layers"]
  idx = np.arange(len(layers))
  for rp, color, off in ((lo, "tab:blue", -0.2), (hi, "tab:red", 0.2)):
    total = model_time(layers, rp)
    ax.bar(idx + off, [100 * l.time(rp) / total for l in layers], width=0.4, color=color,
           label=f"RP {rp:g}")
  ax.set_xlabel(f"MAC op of {label(detail)}, input to output")
  ax.set_ylabel("share of model time (%)")
  ax.set_title(f"{label(detail)}: where the time goes (first layers vs. head)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")

  fig.suptitle("MobileNetV4 section 3 roofline: ModelTime = sum_i max(MACs_i / PeakMACs, "
               f"bytes_i / PeakMemBW), {bytes_per_elem} byte(s) per weight/activation",
               fontsize=11)
  fig.tight_layout()
  _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
  plt.close(fig)


def format_table(results: dict, points: Sequence[float] = REPORT_POINTS) -> str:
  names = list(results)
  ref = REFERENCE if REFERENCE in names else names[0]
  header = (f"{'model':<15}{'res':>5}{'GMACs':>8}{'weight MB':>11}{'act MB':>8}"
            + "".join(f"{f'RP {p:g}':>9}" for p in points))
  lines = [f"Roofline model time relative to {results[ref]['paper_name']} at the same ridge point "
           "(< 1: faster)", header]
  for n in names:
    layers = results[n]["layers"]
    rel = [model_time(layers, p) / model_time(results[ref]["layers"], p) for p in points]
    lines.append(f"{results[n]['paper_name']:<15}{results[n]['resolution']:>5}"
                 f"{sum(l.macs for l in layers) / 1e9:>8.3f}"
                 f"{sum(l.weight_bytes for l in layers) / 2**20:>11.2f}"
                 f"{sum(l.activation_bytes for l in layers) / 2**20:>8.2f}"
                 + "".join(f"{r:>9.2f}" for r in rel))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  quiet_tensorflow(False)  # before the models (Keras) load TensorFlow
  parser = ArgumentParser(prog="mnv4_train.roofline", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for roofline.png and the CSVs")
  parser.add_argument("--models", default=",".join(model_names()),
                      help="comma-separated model names (default: every MNv4 variant and "
                           "baseline)")
  parser.add_argument("--bytes_per_elem", type=int, default=BYTES_PER_ELEM, choices=(1, 2, 4),
                      help="bytes per weight and activation element (1: int8, the default)")
  parser.add_argument("--detail", default=None,
                      help="model whose per-layer times get their own panel (default: conv_m "
                           "if analysed, else the first model)")
  args = parser.parse_args(argv)
  with exit_on_user_error(parser.prog):
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    _check_names(names)
    detail = args.detail or ("conv_m" if "conv_m" in names else names[0])
    if detail not in names:
      raise ConfigError(f"--detail {detail!r} is not among --models; add it or pick one of "
                        f"{', '.join(names)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise InputPathError(f"--out {args.out} is a file; give a folder")
    os.makedirs(args.out, exist_ok=True)
    results = analyse(names, bytes_per_elem=args.bytes_per_elem)
    sweep_csv, layers_csv = write_csvs(results, args.out, RIDGE_POINTS)
    png = os.path.join(args.out, "roofline.png")
    plot(results, png, RIDGE_POINTS, detail=detail, bytes_per_elem=args.bytes_per_elem)
    print(format_table(results))
    print(f"wrote {png}, {sweep_csv}, {layers_csv}")
  return 0


if __name__ == "__main__":
  run_then_exit(main)
