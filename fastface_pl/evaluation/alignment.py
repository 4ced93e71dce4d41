"""Face alignment for evaluation: 5 landmarks onto the ArcFace template by a similarity transform.

The transform is the least-squares similarity (rotation, uniform scale, translation) of Umeyama (1991),
the one ``skimage.transform.SimilarityTransform.estimate`` computes, and the warp samples the source
bilinearly at ``M⁻¹ · (x, y)`` for every output pixel centre with zeros outside the image, which is the
definition of ``cv2.warpAffine(img, M, size, borderValue=0)`` (``INTER_LINEAR``). This warp works in
float32 and rounds once; against OpenCV 5.0 no pixel differs by more than one grey level
(``docs/evaluation.md``).

Example::

    matrix = similarity_transform(landmarks, arcface_template(112))   # float64[2, 3]
    crop = warp_affine(image_uint8_hwc, matrix, 112)                   # uint8[3, 112, 112]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ARCFACE_TEMPLATE_112", "arcface_template", "similarity_transform", "warp_affine"]

# The five ArcFace reference points (left eye, right eye, nose tip, left and right mouth corners) in a
# 112 × 112 crop: the 96 × 112 template of SphereFace shifted 8 pixels right, as InsightFace aligns.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The ArcFace landmark template for an ``image_size`` square crop (scaled from 112), ``float32[5, 2]``."""
    return ARCFACE_TEMPLATE_112 * np.float32(image_size / 112.0)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``source`` points onto ``target`` (Umeyama, with scale).

    Args:
        source: ``float[K, 2]`` points (e.g. detected landmarks), K ≥ 2.
        target: ``float[K, 2]`` points (e.g. :func:`arcface_template`).

    Returns:
        ``float64[2, 3]`` matrix ``M`` with ``target ≈ M @ [x, y, 1]``.

    Raises:
        ValueError: for wrong shapes, non-finite points or coincident source points (no transform exists).
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"expected two point sets of shape [K, 2] (K >= 2), got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError(f"landmarks must be finite numbers, got {src.tolist()}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    src_variance = (src_centred**2).sum() / len(src)
    if src_variance <= 0.0:
        raise ValueError(f"the landmarks {src.tolist()} all coincide: no similarity transform maps them")
    covariance = dst_centred.T @ src_centred / len(src)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[1] = -1.0  # a reflection would fit better: keep a proper rotation (det +1)
    u, singular, vt = np.linalg.svd(covariance)
    if np.linalg.matrix_rank(covariance) == 1:  # collinear points: the sign is decided by U and V alone
        rotation = u @ vt if np.linalg.det(u) * np.linalg.det(vt) > 0 else u @ np.diag([1.0, -1.0]) @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / src_variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_affine(image: np.ndarray | torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """Warps ``image`` by the affine ``matrix`` into a ``size × size`` crop, zeros outside (cv2 semantics).

    Args:
        image: ``uint8[H, W, 3]`` (as PIL / numpy give it).
        matrix: ``float[2, 3]`` mapping source pixel coordinates to crop coordinates (pixel centres at
            integers, x = column), e.g. from :func:`similarity_transform`.
        size: side of the square output.

    Returns:
        ``uint8[3, size, size]`` (channels first).
    """
    source = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))  # writable copy
    if source.dim() != 3 or source.shape[2] != 3:
        raise ValueError(f"expected an image of shape [H, W, 3], got {list(source.shape)}")
    height, width = source.shape[:2]
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]  # crop pixel (x, y) -> source pixel
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # grid_sample with align_corners=False puts pixel centre i at (2i + 1) / n - 1
    grid = np.stack([(2.0 * src_x + 1.0) / width - 1.0, (2.0 * src_y + 1.0) / height - 1.0], axis=-1)
    grid_t = torch.from_numpy(grid).float().unsqueeze(0)
    pixels = source.permute(2, 0, 1).unsqueeze(0).float()
    warped = F.grid_sample(pixels, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0].round_().clamp_(0, 255).to(torch.uint8)
