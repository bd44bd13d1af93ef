"""The checks of an item's remote inputs before a run: image URLs asked for their headers, bucket objects for
their stats."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..api.storage import is_bucket_url
from ..errors import Problem
from ..inputs.stamps import is_url
from ..item import WorkItem

if TYPE_CHECKING:
    import httpx2

    from ..inputs.load import UrlChecklist
    from ..inputs.remote import BucketChecklist

__all__ = ["RemoteChecks"]


class RemoteChecks:
    """The URL and bucket-object checklists, made only once an item has such an input: a manifest of local
    files is validated without loading the HTTP client or the cloud libraries (``validate`` starts sooner)."""

    def __init__(self, file: str, *, check_urls: bool) -> None:
        self.file = file
        self.check_urls = check_urls
        self.urls: UrlChecklist | None = None
        self.objects: BucketChecklist | None = None

    def add(self, item: WorkItem) -> None:
        if self.urls is None and self.objects is None:
            for ref in item.inputs:
                if not ref.startswith(os.sep):
                    break
            else:
                return  # local files only (resolved: absolute), as most items have
        if self.urls is None and any(is_url(ref) for ref in item.inputs):
            from ..inputs.load import UrlChecklist

            self.urls = UrlChecklist()
        if self.objects is None and any(is_bucket_url(ref) for ref in item.inputs):
            from ..inputs.remote import BucketChecklist

            self.objects = BucketChecklist(self.file, stat=self.check_urls)
        if self.urls is not None:
            self.urls.add(item)
        if self.objects is not None:
            self.objects.add(item)

    def problems(self, transport: httpx2.BaseTransport | None) -> list[Problem]:
        found = self.urls.problems(self.file, transport=transport) if self.urls and self.check_urls else []
        return found + (self.objects.flush() if self.objects is not None else [])
