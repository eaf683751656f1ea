"""JPEG decoding on the scoring device: nvJPEG on CUDA (through `torchvision.io.decode_jpeg`), libjpeg on CPU.

With `fiqa score --decode device` the reading stage leaves plain JPEG crops encoded (see
`preprocess.plain_jpeg`: baseline, exactly the model's input size, grey or RGB with full-resolution
chroma, no EXIF rotation) and the scoring actor decodes them here, a whole batch in one call, straight into
device memory: the CPUs only read bytes, and 4-5 KB per face cross the object store and the bus instead of
37 KB of pixels. Everything else, and any JPEG the device decoder refuses, is decoded on the CPU exactly as
before (`decode_face`), so statuses, reasons and scores do not depend on where decoding ran.

On CPU, libjpeg through torchvision gives the same pixels as Pillow (both libjpeg-turbo, same IDCT; tested).
On an H200, nvJPEG gave Pillow's pixels bit for bit on 4:4:4 crops, but upsampled 4:2:0 chroma otherwise
(up to 40 levels apart), hence the 4:4:4 rule (measured by `benchmarks/gpu_check.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


def decode_jpegs(blobs: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """JPEG bytes -> (H, W, 3) uint8 RGB tensors on `device`; None for each image the decoder refused.

    One batched call first (nvJPEG's fast path); torchvision returns nothing of a batch that holds one bad
    image, so a failed batch is decoded again one image at a time to find it."""
    if not blobs:
        return []
    tensors = [torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy()) for blob in blobs]
    # torchvision 0.29 deprecates its image decoders for TorchCodec, which this project's pins do not
    # have yet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return [
                image.permute(1, 2, 0)
                for image in decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
            ]
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device).permute(1, 2, 0))
            except RuntimeError:
                decoded.append(None)
        return decoded
