"""Image resizing of a preset's input pipeline, on device (jit-able).

Some checkpoints were trained on images upsampled from the dataset's stored size (the CIFAR-10
MobileNetV2 of ../shared: 32x32 -> 224x224). :func:`resize_bilinear` is PyTorch's
``F.interpolate(mode='bilinear', align_corners=False, antialias=False)`` written as two small
matrix products, so the same program serves any batch on any backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ArchSpec.resize values: how images of ``data_shape`` become ``input_shape``.
RESIZES = ('bilinear', 'bilinear_round')


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 weights of 1-D linear interpolation with half-pixel centres.

  PyTorch's ``upsample_bilinear2d`` (align_corners=False): source coordinate
  ``src = max((o + 0.5) * in / out - 0.5, 0)``, ``i0 = min(floor(src), in - 1)``,
  ``i1 = i0 + 1`` if ``i0 < in - 1`` else ``i0``, weights ``1 - l`` and ``l = src - i0``.
  Bilinear 2-D is this applied along H and along W.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize sizes must be positive, got {in_size} -> {out_size}')
  scale = in_size / out_size
  o = np.arange(out_size, dtype=np.float64)
  src = np.maximum((o + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  lam = np.clip(src - i0, 0.0, 1.0)
  R = np.zeros((out_size, in_size))
  np.add.at(R, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(R, (np.arange(out_size), i1), lam)
  return R


def resize_bilinear(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
  """NHWC float images resized to ``out_hw`` by :func:`resize_matrix` along H and W (float32,
  full-precision products, so the result does not depend on the backend's matmul precision)."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(out_hw):
    return x
  ry = jnp.asarray(resize_matrix(h, out_hw[0]), jnp.float32)
  rx = jnp.asarray(resize_matrix(w, out_hw[1]), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', ry, x, precision=hi)
  return jnp.einsum('pw,bowc->bopc', rx, x, precision=hi)


def resize(x: jnp.ndarray, out_hw: tuple[int, int], mode: str) -> jnp.ndarray:
  """Pixel-valued NHWC float images resized by ``mode`` (:data:`RESIZES`).

  'bilinear_round' rounds the resized pixels to integers, as a pipeline that resizes uint8 images
  does. After an integer upsampling factor f (32 -> 224: f = 7) every output is a weighted mean of
  integers with weights k / f^2, never within 1 / (2 f^2) of a rounding boundary, far above
  float32 error: any correct implementation gives the same integers.
  """
  if mode not in RESIZES:
    raise ValueError(f'resize mode must be one of {RESIZES}, got {mode!r}')
  y = resize_bilinear(x, out_hw)
  return jnp.round(y) if mode == 'bilinear_round' else y
