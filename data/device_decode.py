"""Device side of ``data.decode=device``: a batch's JPEG files decoded in one batched call on the batch's device,
cropped and resized, flipped and normalised.

    DeviceJpegDecode(img_size, on_corrupt)(batch)   Batch(encoded=EncodedImages) -> Batch(pixels (B, 3, S, S) float)

- Decode: ``torchvision.io.decode_jpeg(files, device=..., mode=RGB)``: nvJPEG on CUDA (the GPU's hardware JPEG
  engine for baseline JPEGs where it has one), libjpeg-turbo on the CPU (tests, smoke runs).
- Crop + resize: ``torchvision.ops.roi_align(..., aligned=True, sampling_ratio=-1)`` samples each box bilinearly at
  the output pixel centres (the half-pixel convention of ``resize``); where a box is wider than S, every output pixel
  averages ceil(box / S)^2 bilinear samples of its bin, an area filter that plays the antialias's part. The CPU path
  resizes with antialiased bicubic: crops, flips and masks are the same, pixels differ by about 1-2/255 on average
  (``tests/test_data_pipeline.py``).
- Images of one size are stacked and cropped in one ``roi_align`` call, one call per distinct size in the batch (a
  re-encoded folder has a single size). Padding every image to the batch's largest instead would make one call, but
  hold B copies of the largest image of the batch (ImageNet has images of several thousand pixels a side) and need
  edge-replicating pads to keep the border samples exact; the launches it saves are a few per distinct size.
- A file that the decoder rejects: the batch is decoded again file by file to find it; it is then skipped (logged,
  counted in ``skipped``, its row dropped from pixels, labels and masks) or raised, naming it, by ``on_corrupt``.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from .batch import Batch, EncodedImages
from .folder import CorruptImageError
from .transforms import DeviceNormalize

logger = logging.getLogger(__name__)


def crop_resize(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """B decoded images (3, H_b, W_b) uint8 and their boxes (B, 5) ``(b, x1, y1, x2, y2)`` -> (B, 3, size, size)
    float crops in [0, 255]; one ``roi_align`` per distinct image size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(row)
    if len(groups) == 1:
        return roi_align(torch.stack(images).float(), boxes, size, aligned=True, sampling_ratio=-1)
    crops: list[torch.Tensor | None] = [None] * len(images)
    for rows in groups.values():
        local = torch.arange(len(rows), device=boxes.device, dtype=boxes.dtype).unsqueeze(1)
        group_boxes = torch.cat([local, torch.cat([boxes[row:row + 1, 1:] for row in rows])], 1)
        out = roi_align(torch.stack([images[row] for row in rows]).float(), group_boxes, size, aligned=True,
                        sampling_ratio=-1)
        for row, crop in zip(rows, out):
            crops[row] = crop
    return torch.stack(crops)


def select_rows(batch: Batch, rows: list[int]) -> Batch:
    """The batch restricted to ``rows`` (its masks, labels and encoded files with it; ``boxes`` renumbered)."""
    device = batch.encoded.boxes.device
    index = torch.tensor(rows, device=device)

    def take(tensor):
        return None if tensor is None else tensor[index.to(tensor.device)]

    masks = [dataclasses.replace(m, context_idx=take(m.context_idx), context_pad=take(m.context_pad),
                                 target_idx=take(m.target_idx), target_pad=take(m.target_pad)) for m in batch.masks]
    enc = batch.encoded
    files = enc.files()
    kept = EncodedImages.pack([files[r] for r in rows], enc.boxes[index, 1:].tolist(), enc.flips[index].tolist(),
                              [enc.paths[r] for r in rows]).to(device)
    return dataclasses.replace(batch, masks=masks, labels=take(batch.labels), encoded=kept)


class DeviceJpegDecode:
    """``Batch`` with ``encoded`` JPEG files -> ``Batch`` with ``pixels`` (B, 3, img_size, img_size) float32,
    ImageNet-normalised, on the device of ``encoded.boxes`` (``encoded`` None afterwards). A batch of uint8 pixels is
    normalised as ``DeviceNormalize`` does."""

    def __init__(self, img_size: int, on_corrupt: str = "skip"):
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"data.on_corrupt '{on_corrupt}' is unknown (expected 'skip' or 'raise')")
        self.img_size, self.on_corrupt = img_size, on_corrupt
        self.normalize = DeviceNormalize()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, batch: Batch) -> Batch:
        if batch.encoded is None:
            return self.normalize(batch)
        device = batch.encoded.boxes.device
        images, batch = self._decode_batch(batch, device)
        pixels = crop_resize(images, batch.encoded.boxes, self.img_size)
        pixels = torch.where(batch.encoded.flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        return dataclasses.replace(batch, pixels=self.normalize.normalize(pixels / 255), encoded=None)

    # ------------------------------------------------------------------------------------------------ decoding
    def _decode_batch(self, batch: Batch, device: torch.device) -> tuple[list[torch.Tensor], Batch]:
        """(decoded (3, H, W) uint8 images, the batch without the rows whose file did not decode)."""
        files = batch.encoded.files()
        try:
            return self._decode(files, device), batch
        except RuntimeError as err:  # one bad file fails the whole call: find it
            failure = err
        images, bad = [], []
        for row, file in enumerate(files):
            try:
                images.append(self._decode([file], device)[0])
            except RuntimeError as err:
                bad.append(row)
                message = (f"corrupt or unreadable image '{batch.encoded.paths[row]}': the JPEG decoder on {device} "
                           f"rejected it: {err}")
                if self.on_corrupt == "raise":
                    raise CorruptImageError(message) from err
                logger.warning("skipping %s", message)
        if not bad:
            raise RuntimeError(f"decoding a batch of {len(files)} JPEG files on {device} failed, though each decodes "
                               f"alone: {failure}") from failure
        if len(bad) == len(files):
            raise RuntimeError(f"every image of a batch of {len(files)} failed to decode on {device}; check data.root")
        kept = sorted(set(range(len(files))) - set(bad))
        batch = dataclasses.replace(select_rows(batch, kept), skipped=batch.skipped + len(bad))
        return images, batch

    def _decode(self, files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if device.type != "cuda":
            return decode_jpeg(files, device=device, mode=ImageReadMode.RGB)
        # torchvision allocates the outputs on the current stream, then nvJPEG writes them from a stream of its own
        # that does not wait for the current one: on the training stream it could be handed a freed block that
        # queued kernels still read. A stream that runs nothing else is safe; record_stream then keeps the outputs'
        # blocks from being reused before the training stream is done with them.
        main = torch.cuda.current_stream(device)
        side = self._streams.setdefault(device, torch.cuda.Stream(device=device))
        with torch.cuda.stream(side):
            images = decode_jpeg(files, device=device, mode=ImageReadMode.RGB)
        main.wait_stream(side)
        for image in images:
            image.record_stream(main)
        return images
