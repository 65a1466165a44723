"""Reading the records' image files below a folder or ``s3://`` prefix (see ``llava_platform.storage``)."""

from __future__ import annotations

from llava_platform.storage import filesystem_for, join


class ImageReader:
    """Reads image files below a root folder or ``s3://`` prefix. One per worker (holds a client)."""

    def __init__(self, image_root: str | None, s3_endpoint_url: str | None = None):
        self.image_root = image_root
        self.filesystem, self.root_path = filesystem_for(image_root, s3_endpoint_url) if image_root else (None, "")

    def read(self, relative: str) -> bytes:
        """The file's bytes.

        Raises:
            FileNotFoundError: no such file (or no image root configured).
        """
        if self.filesystem is None:
            raise FileNotFoundError(f"{relative}: the record names an image but data.image_root is not set")
        path = join(self.root_path, relative)
        with self.filesystem.open_input_stream(path) as stream:
            return stream.readall()
