"""Images of vision rows (an `image` or `images` field): checked and stored as encoded bytes in the
tokenized dataset, turned into pixel values only when a batch is built.

Pixel values are large (a 448x448 image is megabytes of float32), so the dataset keeps the encoded
image and each training worker runs the processor's image processor on its own batch, as TRL's
vision collator does.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, List

TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token image/text types some VLMs take


def encode_image(value: Any) -> bytes:
    """Encoded image bytes from what users hand over: a PIL image, a uint8 array, encoded bytes, a
    file path, or a `datasets` Image dict ({"bytes", "path"}); a JSON row carries bytes as base64.
    A ValueError says what is wrong (formats adds the field)."""
    data = _image_bytes(value)
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as e:
        raise ValueError(f"is not a readable image: {type(e).__name__}: {e}") from None
    return data


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):  # datasets' Image encoding, and bytes after a JSON round trip
        if value.get("bytes") is not None:
            inner = value["bytes"]
            return base64.b64decode(inner) if isinstance(inner, str) else _image_bytes(inner)
        if value.get("path"):
            return _image_bytes(value["path"])
        raise ValueError("is a dict without 'bytes' or 'path'")
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise ValueError(f"is a path to no file: {value!r}")
        with open(value, "rb") as f:
            return f.read()
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        return png_bytes(value)
    if type(value).__module__ == "numpy":
        from PIL import Image

        try:
            return png_bytes(Image.fromarray(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"is an array that is not an image: {e}") from None
    raise ValueError(f"must be an image (a PIL image, bytes, a path or an array), got {type(value).__name__}")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_json(value: Any):
    """JSON form of a PIL image, a pixel array or bytes inside a row (sources.jsonable), read back by
    encode_image; None for anything else."""
    pixels = type(value).__module__ == "numpy" and value.dtype.name == "uint8" and value.ndim in (2, 3)
    if isinstance(value, (bytes, bytearray)) or (hasattr(value, "save") and hasattr(value, "mode")) or pixels:
        return {"bytes": base64.b64encode(_image_bytes(value)).decode("ascii")}
    return None


def decode_images(images: List[bytes]) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB") for data in images]


def multimodal_messages(messages: list, num_images: int) -> list:
    """Messages with structured content: the images as {"type": "image"} placeholders before the text
    of the first user message whose content is a string, every other string content as one text part
    (TRL's prepare_multimodal_messages). Content that is already a list of parts is kept."""
    out, placed = [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                parts = [{"type": "image"} for _ in range(num_images)] + parts
                placed = True
            message = {**message, "content": parts}
        out.append(message)
    return out


def is_processor(processing_class) -> bool:
    """A processor (tokenizer plus image processor) rather than a bare tokenizer."""
    return getattr(processing_class, "image_processor", None) is not None


def text_tokenizer(processing_class):
    """The tokenizer itself: a processor's `.tokenizer`, or the tokenizer it already is."""
    return getattr(processing_class, "tokenizer", None) or processing_class


def num_images(row: dict) -> int:
    images = row.get("images")  # a list, or a numpy array when read back from Ray Data
    return 0 if images is None else len(images)


def image_inputs(rows: list, image_processor) -> dict:
    """The image processor's outputs for a [2B] chosen+rejected batch: each row's images, for its
    chosen sequence and again for its rejected one, by the processor's names (the forward's keywords)."""
    images = [image for row in rows if num_images(row) for image in decode_images(list(row["images"]))]
    if not images:
        return {}
    if image_processor is None:
        raise ValueError("the batch has images but no image processor was given: pass processing_class= the "
                         "model's processor (AutoProcessor.from_pretrained)")
    outputs = image_processor(images=images + images, return_tensors="pt")
    return dict(outputs)
