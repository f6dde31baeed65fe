"""The request path's host-CPU shortcuts (issue 12) keep every answer: base64 clean-up in one C pass,
multipart parts read up to their boundaries and kept in memory."""
import base64

import pytest

from clip import request
from clip.errors import ClientError
from support.images import noise_image

JPEG = noise_image("JPEG", size=(64, 48))
B64 = base64.b64encode(JPEG)


def folded(data: bytes, sep: bytes, width: int = 76) -> bytes:
    return sep.join(data[i:i + width] for i in range(0, len(data), width))


@pytest.mark.parametrize("text", [
    B64,
    base64.urlsafe_b64encode(JPEG),
    B64.rstrip(b"="),
    B64.replace(b"+", b" "),  # a urlencoded form's '+'
    folded(B64, b"\r\n"),  # MIME line breaks
    folded(B64, b"\n\t"),
    folded(B64, b"\x0b\x0c\x1c\x1d\x1e\x1f"),  # what \s matches in ASCII besides the usual ones
    b"  \n" + B64 + b"\n\n",
    b"data:image/jpeg;base64," + folded(B64, b"\n"),
    b"DATA:;base64," + B64,
], ids=range(10))
def test_base64_in_every_accepted_spelling_decodes_to_the_picture(text):
    assert request.decode_text(text) == JPEG


@pytest.mark.parametrize("text", [
    B64.replace(b"A", b"\xc2\xa0", 1),  # a non-ASCII space is no base64
    B64[:10] + b"*" + B64[10:],
    B64[:10] + b"\x00" + B64[10:],
    b"data:image/jpeg," + B64,
    base64.b64encode(b"not a picture"),
], ids=range(5))
def test_what_is_not_base64_of_a_picture_is_a_400(text):
    with pytest.raises(ClientError) as refused:
        request.decode_text(text)
    assert (refused.value.status, refused.value.code) == (400, "invalid_image")
