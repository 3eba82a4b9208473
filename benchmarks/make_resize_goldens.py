"""Writes tests/goldens/openpi_resize.npz: openpi's two resize-with-pad functions on the paths LIBERO images take,
computed by openpi's own code (not ours), for tests/test_resize_parity.py.

- client side: `openpi_client.image_tools.resize_with_pad` (PIL), 256² renders -> 224², what openpi's LIBERO
  client (examples/libero/main.py) sends;
- model side: `openpi.shared.image_tools.resize_with_pad` (JAX), which openpi's input transforms apply: 256² ->
  224² (a 224² model fed renders), the client's 224² -> 112² (the built-in 112² model served to openpi's client,
  `faster-vla eval --protocol openpi`) and 256² -> 112² (the built-in model's own eval and demonstrations).

openpi's JAX function is read from an openpi checkout (`--openpi`, e.g. a clone of Physical-Intelligence/openpi):
its source is taken from src/openpi/shared/image_tools.py and run as written, minus its decorators (openpi's
`at.typecheck` needs openpi's array_typing; the `jax.jit` with static sizes and method is applied here as
openpi applies it). openpi_client 0.1.2 must be importable.

The inputs are not stored: `inputs()` rebuilds them from numpy's legacy RandomState streams, which numpy keeps
fixed across versions: colour squares (sharp edges) and a patch of noise (every pixel a rounding case).

    python benchmarks/make_resize_goldens.py --openpi /tmp/openpi-src
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "goldens" / "openpi_resize.npz"


def _blocks(seed: int, size: int) -> np.ndarray:
    """[256, 256, 3] uint8 of random colour squares `size` pixels wide."""
    colours = np.random.RandomState(seed).randint(0, 256, size=(256 // size, 256 // size, 3)).astype(np.uint8)
    return np.repeat(np.repeat(colours, size, axis=0), size, axis=1)


def inputs() -> np.ndarray:
    """[2, 256, 256, 3] uint8 from fixed RandomState streams: 16-pixel colour squares with a 64² patch of noise
    in the middle (every pixel there a rounding case), and 8-pixel squares (sharp edges everywhere)."""
    first = _blocks(20, 16)
    first[96:160, 96:160] = np.random.RandomState(19).randint(0, 256, size=(64, 64, 3)).astype(np.uint8)
    return np.stack([first, _blocks(21, 8)])


def openpi_jax_resize(openpi: Path):
    """openpi.shared.image_tools.resize_with_pad, from the checkout's source, jitted as openpi jits it."""
    import jax
    import jax.numpy as jnp

    path = openpi / "src" / "openpi" / "shared" / "image_tools.py"
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "resize_with_pad"]
    fn.decorator_list = []
    fn.returns = None
    for arg in fn.args.args:
        arg.annotation = None
    namespace = {"jax": jax, "jnp": jnp}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    jitted = jax.jit(namespace["resize_with_pad"], static_argnums=(1, 2, 3))
    return lambda images, height, width: jitted(images, height, width, jax.image.ResizeMethod.LINEAR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openpi", type=Path, required=True, help="an openpi checkout (its src/openpi/shared)")
    parser.add_argument("--openpi-commit", default=None, help="the checkout's commit (default: git rev-parse HEAD)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import jax
    import PIL
    from openpi_client import image_tools as client_tools

    resize = openpi_jax_resize(args.openpi)
    x256 = inputs()
    with jax.default_device(jax.devices("cpu")[0]):
        jax224 = np.asarray(resize(x256, 224, 224))
        client224 = client_tools.resize_with_pad(x256, 224, 224)
        jax112_from_client = np.asarray(resize(client224, 112, 112))
        jax112 = np.asarray(resize(x256, 112, 112))
    commit = args.openpi_commit or subprocess.run(["git", "-C", str(args.openpi), "rev-parse", "HEAD"],
                                                  capture_output=True, text=True).stdout.strip() or "unknown"
    provenance = {"openpi_commit": commit, "jax": jax.__version__, "pillow": PIL.__version__,
                  "openpi_client": "0.1.2", "inputs": "benchmarks/make_resize_goldens.py inputs()"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **{
        "client_pil/256_to_224": client224,
        "model_jax/256_to_224": jax224,
        "model_jax/client224_to_112": jax112_from_client,
        "model_jax/256_to_112": jax112,
        "provenance": np.array(json.dumps(provenance)),
    })
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB): {provenance}")


if __name__ == "__main__":
    main()
