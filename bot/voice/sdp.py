"""The SDP rules of WhatsApp's business-initiated calls (meta-webrtc.md §1.2, §2.2).

Pure text functions: the offer we send is rewritten from what aiortc makes, and the answer we
get is checked before it reaches aiortc, so a bad one is reported, not crashed on.
"""

from __future__ import annotations

OPUS_PAYLOAD_TYPE = 111  # what Meta's own SDPs use


class SDPError(ValueError):
    """An SDP we cannot use; the message says why (kept short, it reaches the logs)."""


def offer_for_meta(sdp: str) -> str:
    """Our offer as Meta requires it: `a=setup:active` (the business is the DTLS client) and
    only the sha-256 fingerprint (Meta refuses sha-384/512: "Fingerprint algo is not SHA256").

    aiortc never reads the setup attribute of its own offer back, so only the copy sent changes.
    """
    lines: list[str] = []
    for line in sdp.splitlines():
        if line.startswith("a=setup:"):
            line = "a=setup:active"
        elif line.startswith("a=fingerprint:") and not line.lower().startswith(
            "a=fingerprint:sha-256 "
        ):
            continue
        lines.append(line)
    offer = "\r\n".join(lines) + "\r\n"
    check_offer(offer)
    return offer


def check_offer(sdp: str) -> None:
    """What the API will refuse, caught before the POST."""
    lines = sdp.splitlines()
    if "a=setup:active" not in lines:
        raise SDPError("offer must say a=setup:active")
    prints = [line for line in lines if line.startswith("a=fingerprint:")]
    if len(prints) != 1 or not prints[0].lower().startswith("a=fingerprint:sha-256 "):
        raise SDPError("offer must carry exactly one sha-256 fingerprint")
    if not any(
        line.lower().startswith("a=rtpmap:") and "opus/48000" in line.lower() for line in lines
    ):
        raise SDPError("offer must offer Opus")
    if not any(line.startswith("a=candidate:") for line in lines):
        raise SDPError("offer has no ICE candidates (gathering did not finish)")


def check_answer(sdp: str) -> None:
    """An answer we can apply: an audio section, ICE credentials, a fingerprint, a DTLS role of
    `passive` (Meta's) or `active`."""
    lines = [line.strip() for line in sdp.splitlines() if line.strip()]
    if not lines or lines[0] != "v=0":
        raise SDPError("answer is not SDP")
    if not any(line.startswith("m=audio ") for line in lines):
        raise SDPError("answer has no audio section")
    if not any(line.startswith("a=ice-ufrag:") for line in lines):
        raise SDPError("answer has no ICE credentials")
    if not any(line.lower().startswith("a=fingerprint:sha-256 ") for line in lines):
        raise SDPError("answer has no sha-256 fingerprint")
    if not {"a=setup:passive", "a=setup:active"} & set(lines):
        raise SDPError("answer must say a=setup:passive or a=setup:active")
