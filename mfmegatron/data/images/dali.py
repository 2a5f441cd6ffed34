"""The NVIDIA DALI backend (``gpu`` extra; imported only through
:func:`~mfmegatron.data.images.build_image_loader` or directly).

Two readers feed the same DALI graph (decode -> aspect-preserving resize -> crop):

``reader="mfmegatron"`` (default)
    :class:`~mfmegatron.data.images.reader.ImageShardReader` reads the encoded bytes in the
    prompt reader's computed order and an ``external_source`` hands them to DALI with each
    image's planned resize size and crop window; DALI decodes (on the CPU, or "mixed" on
    ``device_id``), resizes and slices. The samples, their order, the crops and the state are
    exactly the Pillow backend's, so resumption is exact (any data-parallel size, merged states)
    and the two backends' states are interchangeable. The plan comes from the file header read
    by Pillow (size and EXIF orientation, no decoding). A sample whose header Pillow cannot read
    is skipped and counted; a file that passes the header check but fails in DALI's decoder
    stops the pipeline with DALI's error (DALI's decoders cannot skip a sample).
``reader="dali"``
    DALI's own ``fn.readers.webdataset`` (reading, shuffling and sharding in DALI's threads): a
    shuffle buffer of ``initial_fill`` samples, ``shard_id=rank`` / ``num_shards=world_size``
    (contiguous parts of the sample list), resize ``mode="not_smaller"`` and ``fn.crop`` at
    ``crop_pos=0.5`` or DALI-random positions. Resumable only through DALI's pipeline
    checkpoint, stored base64 in the state: the same rank, data-parallel size, shards, seed and
    settings continue exactly (checked); another data-parallel size, or a state of the other
    reader, cannot be loaded. ``window_shards`` and ``load_embeddings`` do not apply: no
    ``.json`` metadata, no text embeddings, no ``epochs`` limit (the reader wraps around without
    marking epochs: ``epochs`` / ``positions`` are -1); samples without an image or ``.txt`` are
    skipped silently and uncounted, and an undecodable image stops the pipeline.

Output: the images are sliced as uint8 ``[H, W, 3]`` in DALI and normalised in torch
(:func:`~mfmegatron.data.images.transforms.to_unit_range`), on the CPU or on ``cuda:device_id``;
DALI has no bfloat16, and uint8 is the smallest copy out of the pipeline.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from mfmegatron.data import format as fmt
from mfmegatron.data.images.geometry import plan_crop
from mfmegatron.data.images.loader import ImageBatch, ImageBatchLoader, collate_images
from mfmegatron.data.images.reader import IMAGE_EXTS, ImageSample, ImageShardReader
from mfmegatron.data.images.transforms import peek_image
from mfmegatron.data.reader import PromptSample, _fingerprint, _resolve_source

READERS = ("mfmegatron", "dali")
NATIVE_STATE_FORMAT = "mfmegatron.data.images.DALIWebDatasetReader/1"
_INSTALL_HINT = (
    "backend='dali' needs NVIDIA DALI: pip install 'mfmegatron[gpu]' (or nvidia-dali-cuda130; "
    "NGC containers ship it), or use backend='pil'"
)


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return dali, fn, types, feed_ndarray


class DALIImageBatchLoader(ImageBatchLoader):
    """Image batches decoded and resized by DALI (see the module docstring for the two readers).

    ``device_id=None`` runs every operator on the CPU (``num_threads`` worker threads); with a
    device id the decoder runs "mixed" (nvJPEG, hardware JPEG decoder where present), resize and
    crop run on that GPU and batches arrive on ``cuda:device_id``. ``prefetch`` is DALI's
    ``prefetch_queue_depth``. The other arguments are :class:`PILImageBatchLoader`'s.
    """

    backend = "dali"

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        size: int | tuple[int, int],
        crop: str = "center",
        filter: str = "bilinear",
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        window_shards: int | None = 16,
        epochs: int | None = None,
        load_embeddings: bool = True,
        prefetch: int = 2,
        device_id: int | None = None,
        num_threads: int | None = None,
        reader: str = "mfmegatron",
        initial_fill: int = 1024,
        **collate_options,
    ) -> None:
        self._dali = _import_dali()
        rank, world_size = self._set_options(
            batch_size, size, crop, filter, dtype, seed, rank, world_size
        )
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if prefetch < 1:
            raise ValueError("prefetch (DALI's prefetch_queue_depth) must be >= 1")
        self.reader_kind, self.device_id = reader, device_id
        self.rank, self.world_size = rank, world_size
        self.prefetch = prefetch
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._collate_options = collate_options
        self._pipe = None
        self._exhausted = False
        if reader == "mfmegatron":
            self.reader = ImageShardReader(
                source, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                window_shards=window_shards, epochs=epochs, load_embeddings=load_embeddings,
                prepare=self._plan,
            )  # fmt: skip
            self._pending: deque[tuple[list[ImageSample], dict[str, Any]]] = deque()
            self._delivered_state = self.reader.state_dict()
        else:
            if epochs is not None:
                raise ValueError(
                    "reader='dali' streams endlessly (DALI's reader wraps around without marking "
                    "epochs); use reader='mfmegatron' for a finite number of epochs"
                )
            manifest, errors = _resolve_source(source)
            if errors:
                raise ValueError(f"reader='dali' cannot skip damaged shards: {errors}")
            self.reader = None
            self.paths = [os.path.abspath(s.path) for s in manifest.shards]
            self.shuffle, self.initial_fill = shuffle, initial_fill
            self._fingerprint = _fingerprint(manifest)
            self._checkpoint: bytes | None = None
            self._batches = 0

    # -- the graph ----------------------------------------------------------------------------

    def _interp(self):
        types = self._dali[2]
        return {
            "bilinear": types.INTERP_LINEAR,
            "bicubic": types.INTERP_CUBIC,
            "lanczos": types.INTERP_LANCZOS3,
        }[self.filter]

    def _build(self) -> None:
        dali, fn, types, _ = self._dali
        height, width = self.size
        decoder_device = "cpu" if self.device_id is None else "mixed"
        native = self.reader_kind == "dali"
        pipe = dali.Pipeline(
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
            prefetch_queue_depth=self.prefetch, seed=self.seed,
            enable_checkpointing=native, checkpoint=self._checkpoint if native else None,
        )  # fmt: skip
        with pipe:
            if native:
                encoded, text = fn.readers.webdataset(
                    paths=self.paths, ext=[";".join(IMAGE_EXTS), fmt.TXT],
                    missing_component_behavior="skip", random_shuffle=self.shuffle,
                    initial_fill=self.initial_fill, seed=self.seed, shard_id=self.rank,
                    num_shards=self.world_size, name="Reader",
                )  # fmt: skip
                info = fn.get_property(encoded, key="source_info")
                images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
                images = fn.resize(
                    images, size=[height, width], mode="not_smaller", subpixel_scale=False,
                    interp_type=self._interp(), antialias=True,
                )  # fmt: skip
                if self.crop == "center":
                    pos_x = pos_y = 0.5
                else:
                    pos_x = fn.random.uniform(range=[0.0, 1.0])
                    pos_y = fn.random.uniform(range=[0.0, 1.0])
                images = fn.crop(images, crop=(height, width), crop_pos_x=pos_x, crop_pos_y=pos_y)
                pipe.set_outputs(images, text, info)
            else:
                encoded, resized, anchor, position = fn.external_source(
                    source=self._feed, num_outputs=4, batch=True,
                    dtype=[types.UINT8, types.FLOAT, types.INT32, types.INT64],
                )  # fmt: skip
                images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
                images = fn.resize(
                    images, size=resized, interp_type=self._interp(), antialias=True
                )
                images = fn.slice(images, start=anchor, shape=[width, height], axis_names="WH")
                pipe.set_outputs(images, position)
        pipe.build()
        self._pipe = pipe

    # -- reader="mfmegatron": the external source -----------------------------------------------

    def _plan(self, sample: ImageSample):
        header = peek_image(sample.image)
        return plan_crop(
            header.height, header.width, self.size, self.crop, seed=self.seed,
            position=sample.position,
        )  # fmt: skip

    def _feed(self):
        """DALI's source callback: one batch per call, in order (DALI calls it up to
        ``prefetch`` batches ahead of what :meth:`__next__` has returned)."""
        samples = self.reader.take(self.batch_size)
        if not samples:
            raise StopIteration
        self._pending.append((samples, self.reader.state_dict()))
        encoded = [np.frombuffer(s.image, dtype=np.uint8) for s in samples]
        plans = [s.prepared for s in samples]
        resized = [np.array([p.resized_height, p.resized_width], np.float32) for p in plans]
        anchor = [np.array([p.left, p.top], np.int32) for p in plans]
        position = [np.array([s.position], np.int64) for s in samples]
        for s in samples:  # DALI copies the inputs; keep the rest of the sample only
            s.image = b""
        return encoded, resized, anchor, position

    def _to_torch(self, images) -> torch.Tensor:
        feed_ndarray = self._dali[3]
        shape = (len(images), *self.size, 3)
        out = torch.empty(shape, dtype=torch.uint8, device=self.device)
        dense = images.as_tensor()  # every window is [H, W, 3]
        if self.device_id is None:
            feed_ndarray(dense, out)
        else:
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def __next__(self) -> ImageBatch:
        if self._exhausted:
            raise StopIteration
        if self._pipe is None:
            self._build()
        try:
            outputs = self._pipe.run()
        except StopIteration:
            self._exhausted = True
            self._pipe = None
            raise
        if self.reader_kind == "dali":
            return self._native_batch(*outputs)
        images, positions = outputs
        samples, state = self._pending.popleft()
        got = [int(np.asarray(positions[i])[0]) for i in range(len(positions))]
        want = [s.position for s in samples]
        if got != want:  # the FIFO and DALI's batches must agree
            raise RuntimeError(f"DALI returned the samples at positions {got}, expected {want}")
        batch = collate_images(samples, self._to_torch(images), [s.prepared for s in samples],
                               dtype=self.dtype, **self._collate_options)  # fmt: skip
        self._delivered_state = state
        return batch

    # -- reader="dali" ------------------------------------------------------------------------

    def _native_batch(self, images, text, info) -> ImageBatch:
        samples = []
        for i in range(len(text)):
            source = bytes(np.asarray(info[i])).decode("utf-8")  # "path:offset:KEY.ext"
            path, _, member = source.rsplit(":", 2)
            key = (fmt.split_member_name(member) or (member, ""))[0]
            prompt = bytes(np.asarray(text[i])).decode("utf-8")
            samples.append(PromptSample(key, prompt, None, os.path.basename(path), -1, -1))
        batch = collate_images(samples, self._to_torch(images), [None] * len(samples),
                               dtype=self.dtype, **self._collate_options)  # fmt: skip
        self._checkpoint = self._pipe.checkpoint()
        self._batches += 1
        return batch

    def _native_config(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
            "shuffle": self.shuffle, "initial_fill": self.initial_fill,
            "fingerprint": self._fingerprint, "batch_size": self.batch_size,
            "size": list(self.size), "crop": self.crop, "filter": self.filter,
        }  # fmt: skip

    # -- state --------------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        if self.reader_kind == "dali":
            return {"delivered": self._batches * self.batch_size}
        counters = dict(self._delivered_state["counters"])
        counters["bad_shards"] = len(self._delivered_state["bad_shards"])
        return counters

    def state_dict(self) -> dict[str, Any]:
        """reader='mfmegatron': the reader's state as of the last batch returned (a
        PromptShardReader state). reader='dali': DALI's checkpoint of the pipeline as of the last
        batch returned, with the settings it is only valid for."""
        if self.reader_kind == "mfmegatron":
            return dict(self._delivered_state)
        checkpoint = self._checkpoint
        return {
            "format": NATIVE_STATE_FORMAT,
            **self._native_config(),
            "batches": self._batches,
            "checkpoint": base64.b64encode(checkpoint).decode() if checkpoint else None,
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        self._pipe = None  # prefetched batches belong to the old position
        self._exhausted = False
        if self.reader_kind == "mfmegatron":
            if isinstance(state, dict) and state.get("format") == NATIVE_STATE_FORMAT:
                raise ValueError("a reader='dali' state cannot be loaded with reader='mfmegatron'")
            self._pending.clear()
            self.reader.load_state_dict(state)
            self._delivered_state = self.reader.state_dict()
            return
        if not isinstance(state, dict) or state.get("format") != NATIVE_STATE_FORMAT:
            raise ValueError(
                "reader='dali' resumes only from its own state (DALI's pipeline checkpoint), not "
                "from a PromptShardReader / Pillow-backend state or a list of rank states"
            )
        for name, value in self._native_config().items():
            if state[name] != value:
                raise ValueError(
                    f"state was saved with {name}={state[name]!r} but this loader has "
                    f"{name}={value!r}; DALI's checkpoint is only valid for the same settings"
                )
        self._batches = int(state["batches"])
        self._checkpoint = base64.b64decode(state["checkpoint"]) if state["checkpoint"] else None

    def close(self) -> None:
        self._pipe = None
        if self.reader is not None:
            self.reader.close()

