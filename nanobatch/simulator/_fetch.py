"""``fileData`` inputs: the simulator fetches http(s) URLs on this machine, as the real API fetches public and
signed URLs; any other URI (``gs://``, a host elsewhere) keeps its stand-in picture, so nothing leaves the
machine."""

from __future__ import annotations

import dataclasses

import httpx2

from ..loopback import loopback_url
from .errors import InvalidRequest
from .validation import ParsedRequest, open_image

__all__ = ["fetch_files"]

# Our wording: Google's exact message for a URL it could not fetch is not documented.
CANNOT_FETCH = "Cannot fetch content from the provided URL: {uri} answered HTTP {status}."


async def fetch_files(parsed: ParsedRequest) -> ParsedRequest:
    """*parsed* with the pictures of its loopback fileData URLs fetched; InvalidRequest if one cannot be."""
    wanted = [image for image in parsed.images if image.uri is not None and loopback_url(image.uri)]
    if not wanted:
        return parsed
    images = list(parsed.images)
    async with httpx2.AsyncClient(timeout=30.0, follow_redirects=True) as client:
        for index, image in enumerate(images):
            if image.uri is None or not loopback_url(image.uri):
                continue
            try:
                response = await client.get(image.uri)
            except httpx2.HTTPError:
                raise InvalidRequest(CANNOT_FETCH.format(uri=image.uri, status="nothing")) from None
            if not response.is_success:
                raise InvalidRequest(CANNOT_FETCH.format(uri=image.uri, status=response.status_code))
            images[index] = dataclasses.replace(image, image=open_image(response.content))
    return dataclasses.replace(parsed, images=tuple(images))
