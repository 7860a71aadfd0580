"""The page's upload components: a file the user sent, handed on as its path, never fetched from anywhere.

gradio's own Image and File inputs accept a URL in place of an upload and download it on the server, and gr.Image
decodes uploads with PIL before the handler runs. Here a URL is refused (the server makes no outside request), and
the uploaded file reaches the handler undecoded, so it goes through the one image normaliser
(`controlkit.image.load_image`) with its bounds and one-line errors, like every other input of the toolkit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio_client import utils as client_utils

#: Display height of image fields in pixels, and the class that scales their image to fill it (`CSS`): a 64 x 64
#: demo image is shown scaled up, a large photo scaled down.
IMAGE_HEIGHT = 256
IMAGE_CLASS = "controlkit-image"
CSS = f".{IMAGE_CLASS} img {{ width: 100%; height: 100%; object-fit: contain; }}"
#: What a refused URL input says.
UPLOAD_ONLY = "images are taken as uploads only; this server fetches nothing from other machines"


def control_image(label: str) -> gr.Image:
    """An image upload whose handler value is the uploaded file's path, undecoded (None when empty)."""
    image = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                     buttons=["fullscreen"], height=IMAGE_HEIGHT, elem_classes=[IMAGE_CLASS])
    image.preprocess = _path_of
    return _local_files_only(image)


def image_files(label: str) -> gr.File:
    """An upload of one image or many whose handler value is their paths."""
    return _local_files_only(gr.File(label=label, file_count="multiple", type="filepath"))


# The behaviours are given to each component rather than by subclassing: gradio writes a .pyi stub beside the
# module of every component subclass it sees defined. No event may update these components' properties (gradio
# would rebuild them from their class, without these).
def _local_files_only(component: Any) -> Any:
    """Refuse the URL form of the component's file input, which gradio would otherwise download."""
    move, move_async = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    def refuse_or_move(url_or_file_path: str | Path | None) -> str | None:
        _refuse_url(url_or_file_path)
        return move(url_or_file_path)

    async def refuse_or_move_async(url_or_file_path: str | Path | None) -> str | None:
        _refuse_url(url_or_file_path)
        return await move_async(url_or_file_path)

    component.move_resource_to_block_cache = refuse_or_move
    component.async_move_resource_to_block_cache = refuse_or_move_async
    return component


def _path_of(payload: Any) -> str | None:
    """gr.Image's input as the uploaded file's path; an inline data: image would skip the upload size limit."""
    if payload is None:
        return None
    if payload.url and payload.url.startswith("data:"):
        raise gr.Error(UPLOAD_ONLY, print_exception=False)
    return str(payload.path)


def _refuse_url(value: Any) -> None:
    if value is not None and client_utils.is_http_url_like(str(value)):
        raise gr.Error(UPLOAD_ONLY, print_exception=False)
