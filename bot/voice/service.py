"""Speaking on calls, and the media of Meta calls: from the prepared leg to the hang-up.

Meta number: our WebRTC offer goes with the POST; the answer comes by the raw `calls` webhook or
by polling `GET /v1/calls/{id}?includeSdp=1`, whichever is first; once media is up and the callee
answered, the message plays (`repeat` times), then the bot terminates the call and closes the
peer connection. Web number: the message is played by `/play` from a signed URL the bot serves
(when `PUBLIC_BASE_URL` is set), else streamed as PCM16 over `/realtime-session`.

Several replicas (REDIS_URL): the peer connection lives in the replica that placed the call, the
webhooks reach any; what its waiter needs crosses over by bot.voice.relay.

Every failure ends the call with a reason the chat shows; no peer connection or task outlives its
call. Nothing here knows aiogram.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from bot import states
from bot.calls.lifecycle import CallTracker
from bot.errors import CallbotError, describe
from bot.pilot_status.client import PilotStatusClient
from bot.pilot_status.errors import BadRequestError, PilotStatusError
from bot.pilot_status.models import NumberType
from bot.storage.store import CallRecord, Store, utcnow
from bot.voice.media import Leg, MediaEndpoint, MediaSession
from bot.voice.realtime import stream_pcm
from bot.voice.relay import CLAIM_TTL_SECONDS, LocalRelay, Relay
from bot.voice.sdp import SDPError
from bot.voice.shelf import Shelf
from bot.voice.speech import Audio, Speaker, Speech, tone

RATE = 48_000  # what a Meta leg's audio is made at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VoicePolicy:
    repeat: int = 2  # times the message is said
    gap: float = 1.0  # seconds of silence between two sayings
    answer_timeout: float = 20.0  # Meta: seconds to get and apply the SDP answer (else 138007)
    answer_poll_interval: float = 1.0
    connect_timeout: float = 10.0  # seconds for ICE and DTLS once the answer is applied, and
    # then for the callee's first audio once they answered
    ring_timeout: float = 60.0  # seconds the callee has to answer
    max_sessions: int = 10  # Meta calls with media at once
    realtime_rate: int = 16_000  # PCM16 sample rate on /realtime-session
    claim_lapse: float = CLAIM_TTL_SECONDS  # seconds between looks at calls left to a replica
    talk_wait: float = 60.0  # seconds an answered talk call waits for its operator's voice


class _Failure(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(eq=False)
class VoiceLeg:
    """What one call needs from the voice side: its audio (synthesized while the call is placed
    and rings, since it is needed only once the callee answers; repeated as the policy says only
    then, so a storm of ringing calls holds one saying each, shared with the Speaker's cache),
    and on Meta its peer connection."""

    synthesize: Callable[[], Coroutine[Any, Any, Audio]]
    repeat: tuple[int, float] = (1, 0.0)  # times said, seconds of silence between two sayings
    session: MediaSession | None = None
    release: Callable[[], None] | None = None
    shelved: str | None = None  # the URL of its audio on the shelf, for /play
    talk: bool = False  # an operator speaks on it (bot.softphone); nothing is played
    sound: asyncio.Future[Audio] | None = None  # its synthesis, once started

    @property
    def offer_sdp(self) -> str | None:
        return self.session.offer_sdp if self.session is not None else None

    def prime(self) -> None:
        """Start the synthesis (in the background) if it has not started yet."""
        if self.sound is None:
            self.sound = asyncio.ensure_future(self.synthesize())

    async def audio(self) -> Audio:
        self.prime()
        assert self.sound is not None
        return (await asyncio.shield(self.sound)).repeated(*self.repeat)

    async def close(self) -> None:
        release, self.release = self.release, None
        if self.sound is not None and not self.sound.done():
            self.sound.cancel()  # and let the engine's process be ended and reaped
            await asyncio.gather(self.sound, return_exceptions=True)
        try:
            if self.session is not None:
                await self.session.close()
        finally:
            if release is not None:
                release()


@dataclass(eq=False)
class _Watch:
    """What a call's driver waits on: its status as stored, and Meta's SDP answer."""

    status: str
    refs: tuple[str, ...] = ()  # the call's Pilot and external (wacid) ids
    answer: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, status: str) -> None:
        self.status = status
        self.changed.set()

    async def until(self, wanted: Callable[[str], bool], within: float | None = None) -> bool:
        """Whether the status became `wanted` within `within` seconds (None: no limit)."""
        deadline = None if within is None else time.monotonic() + within
        while not wanted(self.status):
            self.changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return wanted(self.status)
        return True


@dataclass(eq=False)
class TalkLine:
    """A Meta call whose media this process holds, open to an operator's voice: the softphone's
    bridge (bot.softphone.bridge) speaks and listens on `session`, says when it `joined`, and
    `hang_up` ends the call (the operator hung up, or their browser is gone)."""

    call_id: str
    session: MediaSession
    hang_up: Callable[[], Coroutine[Any, Any, None]]
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the call's media is closed


# which part of the media did not come up → the reason the call's message gives
_MEDIA_DOWN = {"ice": "media_no_connection", "dtls": "media_dtls_failed"}


def _has_voice(record: CallRecord) -> bool:
    """Whether a process drives the call's voice: a Meta call's media, a web call's note."""
    return record.number_type == NumberType.META.value or record.spoken


def _answered(status: str) -> bool:
    return status == "ACCEPTED" or states.is_terminal(status)


class Voice:
    def __init__(
        self,
        client: PilotStatusClient,
        store: Store,
        tracker: CallTracker,
        speaker: Speaker,
        endpoint: MediaEndpoint,
        *,
        policy: VoicePolicy | None = None,
        shelf: Shelf | None = None,
        relay: Relay | None = None,
        default_text: Callable[[str], str] = lambda _locale: "This is an automated call.",
    ) -> None:
        self._client = client
        self._store = store
        self._tracker = tracker
        self._speaker = speaker
        self._endpoint = endpoint
        self.policy = policy or VoicePolicy()
        self._shelf = shelf
        self.relay: Relay = relay or LocalRelay()
        self._default_text = default_text
        self._open = 0
        self._streaming = 0  # web calls streaming over /realtime-session now
        self._watches: dict[str, _Watch] = {}
        self._lines: dict[str, TalkLine] = {}  # Meta calls of ours, by our call id
        self._refs: dict[str, str] = {}  # Pilot or external call id → our call id
        self._early: dict[str, tuple[float, str]] = {}  # answers that came before the POST's reply
        self._tasks: set[asyncio.Task[None]] = set()
        tracker.subscribe(self.call_changed)
        tracker.on_answer(self.answer_arrived)

    @property
    def open_sessions(self) -> int:
        """Meta peer connections this process holds."""
        return self._open

    @property
    def realtime_sessions(self) -> int:
        """Realtime PCM streams this process is sending."""
        return self._streaming

    # before the call is placed

    def line(self, call_id: str) -> TalkLine | None:
        """The live Meta call `call_id` if this process holds its media."""
        return self._lines.get(call_id)

    async def prepare(
        self, number_type: NumberType, speech: Speech | None, locale: str, *, talk: bool = False
    ) -> VoiceLeg | None:
        if speech is not None and not self._speaker.available:
            raise CallbotError("speech_unavailable")
        if number_type is not NumberType.META:
            # synthesized once the POST is on its way (see begin)
            return None if speech is None else self._leg(partial(self._audio, speech))
        if self._open >= self.policy.max_sessions:
            raise CallbotError("media_busy", {"max": str(self.policy.max_sessions)})
        self._open += 1  # the slot is taken before any await: two /calls cannot both pass
        if talk:  # an operator speaks on it: nothing is played
            leg = VoiceLeg(self._silence, release=self._release, talk=True)
        elif speech is None and not self._speaker.available:
            # no engine: the callee still hears that the call is for them
            leg = self._leg(self._tone, release=self._release)
        else:
            said = speech or Speech.for_locale(self._default_text(locale), locale)
            leg = self._leg(partial(self._audio, said), release=self._release)
        leg.prime()  # synthesized while the peer connection gathers its offer
        try:
            leg.session = await self._endpoint.open_session()
        except BaseException as err:
            await leg.close()
            if not isinstance(err, Exception):
                raise
            log.exception("cannot open a media session")
            raise CallbotError("media_unavailable") from err
        return leg

    def _leg(self, synthesize: Callable[[], Coroutine[Any, Any, Audio]], **more: Any) -> VoiceLeg:
        """A leg that plays what `synthesize` makes, repeated as the policy says."""
        return VoiceLeg(synthesize, repeat=(self.policy.repeat, self.policy.gap), **more)

    def _release(self) -> None:
        self._open -= 1

    async def _silence(self) -> Audio:
        return Audio(b"", RATE)

    async def _tone(self) -> Audio:
        return tone()

    async def _audio(self, speech: Speech) -> Audio:
        """What the callee hears, synthesized off the call's hot path (the POST never waits
        for espeak-ng; the Speaker caches it). If synthesis fails, a tone instead."""
        try:
            said = await self._speaker.speak(speech)
        except Exception as err:  # SpeechError, or the engine could not even be started
            log.warning("speech failed, the call plays a tone instead: %s", err)
            said = tone()
        return said

    # after the API accepted the call

    def begin(self, leg: Leg, record: CallRecord) -> None:
        if not isinstance(leg, VoiceLeg):
            raise TypeError("a leg prepared by another voice side")
        refs = tuple(filter(None, (record.pilot_call_id, record.external_call_id)))
        watch = _Watch(record.status, refs)
        self._watches[record.id] = watch
        for ref in refs:
            self._refs[ref] = record.id
            early = self._early.pop(ref, None)
            if early is not None and not watch.answer.done():
                watch.answer.set_result(early[1])
        leg.prime()  # the POST went out: its audio is synthesized while it rings
        task = asyncio.create_task(self._drive(leg, record, watch), name=f"voice {record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def call_changed(self, record: CallRecord) -> None:
        watch = self._watches.get(record.id)
        if watch is not None:
            watch.update(record.status)
        elif _has_voice(record) and record.pilot_call_id is not None:
            await self.relay.share_status(record.id, record.status)  # its voice may be elsewhere

    async def answer_arrived(self, ref: str, sdp: str) -> None:
        """Meta's SDP answer from the `calls` webhook."""
        watch = self._watch_of(ref)
        if watch is None:
            now = time.monotonic()
            self._early = {k: v for k, v in self._early.items() if now - v[0] < 60}
            if len(self._early) < 1000:
                self._early[ref] = (now, sdp)
            await self.relay.share_answer(ref, sdp)  # for the replica holding its media
        elif not watch.answer.done():
            watch.answer.set_result(sdp)

    def _watch_of(self, ref: str) -> _Watch | None:
        call_id = self._refs.get(ref)
        return self._watches.get(call_id) if call_id else None

    # what other replicas relay (bot.voice.relay.Waiters)

    def answer_came(self, ref: str, sdp: str) -> None:
        """Another replica's answer: only for a registered waiter (an earlier one is kept in
        Redis, and found there by `_catch_up`)."""
        watch = self._watch_of(ref)
        if watch is not None and not watch.answer.done():
            watch.answer.set_result(sdp)

    def status_came(self, call_id: str, status: str) -> None:
        watch = self._watches.get(call_id)
        if watch is not None and states.advances(watch.status, status):
            watch.update(status)

    async def catch_up(self) -> None:
        """After the relay lost Redis for a while: every waiter looks up what it waits for."""
        for call_id, watch in list(self._watches.items()):
            await self._catch_up(call_id, watch)

    async def _catch_up(self, call_id: str, watch: _Watch) -> None:
        """What reached another replica before this waiter could hear it: an answer kept in
        Redis, and the status as stored."""
        if not self.relay.shared:
            return
        try:
            if not watch.answer.done():
                sdp = await self.relay.kept_answer(watch.refs)
                if sdp and not watch.answer.done():
                    watch.answer.set_result(sdp)
            current = await self._store.get_call(call_id)
        except Exception as err:
            log.warning("call %s: media catch-up failed (%s)", call_id, type(err).__name__)
            return
        if current is not None:
            self.status_came(call_id, current.status)

    async def _drive(self, leg: VoiceLeg, record: CallRecord, watch: _Watch) -> None:
        try:
            await self.relay.claim(record.id)  # other replicas leave this call to us
            if leg.session is not None:
                line = TalkLine(record.id, leg.session, lambda: self._hang_up_talk(record))
                self._lines[record.id] = line
                try:
                    await self._drive_meta(leg, line, record, watch)
                finally:
                    line.ended.set()
                    self._lines.pop(record.id, None)
            else:
                await self._drive_web(leg, record, watch)
        except _Failure as failure:
            log.warning("call %s: %s", record.id, failure.code)
            await self._end(record, "FAILED", failure.code)
        except PilotStatusError as err:
            log.warning("call %s: voice stopped by the API: %s", record.id, describe(err).code)
            await self._end(record, "FAILED", "media_failed")
        except Exception:
            log.exception("call %s: voice failed", record.id)
            await self._end(record, "FAILED", "media_failed")
        finally:
            await leg.close()
            if leg.shelved is not None and self._shelf is not None:
                await self._shelf.forget(leg.shelved)
            self._watches.pop(record.id, None)
            for ref in (record.pilot_call_id, record.external_call_id):
                self._refs.pop(ref or "", None)
            await self.relay.release(record.id)

    async def _drive_meta(
        self, leg: VoiceLeg, line: TalkLine, record: CallRecord, watch: _Watch
    ) -> None:
        session = line.session
        await self._catch_up(record.id, watch)
        answer = await self._answer(record, watch)
        if answer is None:
            return  # the call ended first; the tracker shows why
        try:
            await session.apply_answer(answer)
        except SDPError as err:
            log.warning("call %s: unusable SDP answer: %s", record.id, err)
            raise _Failure("media_bad_answer") from None
        connecting = session.wait_connected(self.policy.connect_timeout)
        ended, down = await self._unless_ended(watch, connecting)
        if ended:
            return
        if down is not None:
            raise _Failure(_MEDIA_DOWN[down])
        if not await self._picked_up(record, watch):
            return
        # Up, and answered: the callee's audio must arrive too, else ours is not getting
        # through either (media blocked after the handshake, a peer that sends nothing).
        ended, heard = await self._unless_ended(
            watch, session.wait_heard(self.policy.connect_timeout)
        )
        if ended:
            return
        if not heard:
            raise _Failure("media_no_rtp")
        if not leg.talk:
            ended, _ = await self._unless_ended(watch, self._say_unless_joined(leg, line))
            if ended:
                return
            if not line.joined.is_set():
                await self._end(record, "COMPLETED", None, spoken=True)
                return
        # an operator speaks: the call lasts until either side hangs up (`line.hang_up`)
        ended, joined = await self._unless_ended(watch, self._joined(line))
        if ended:
            return
        if not joined:
            log.info("call %s: no operator came to talk", record.id)
            await self._end(record, "COMPLETED", None)
            return
        await watch.until(states.is_terminal)

    async def _joined(self, line: TalkLine) -> bool:
        """Whether an operator's voice is on the call, or comes within the policy's wait."""
        with suppress(TimeoutError):
            await asyncio.wait_for(line.joined.wait(), self.policy.talk_wait)
        return line.joined.is_set()

    async def _say_unless_joined(self, leg: VoiceLeg, line: TalkLine) -> None:
        """The message, cut short when an operator's voice joins the call."""
        play = asyncio.ensure_future(line.session.play(await leg.audio()))
        joined = asyncio.ensure_future(line.joined.wait())
        try:
            await asyncio.wait({play, joined}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for step in (play, joined):
                step.cancel()
            await asyncio.gather(play, joined, return_exceptions=True)

    async def _hang_up_talk(self, record: CallRecord) -> None:
        """The operator hung up, or their browser left and did not come back."""
        watch = self._watches.get(record.id)
        if watch is not None and not states.is_terminal(watch.status):
            await self._end(record, "COMPLETED", None)

    async def _answer(self, record: CallRecord, watch: _Watch) -> str | None:
        """Meta's SDP answer, from the webhook or the API, whichever is first; None if the call
        ended before it."""
        assert record.pilot_call_id is not None
        poll: asyncio.Future[Any] = asyncio.ensure_future(self._poll_answer(record.pilot_call_id))
        ended: asyncio.Future[Any] = asyncio.ensure_future(watch.until(states.is_terminal))
        try:
            answer: asyncio.Future[Any] = watch.answer
            await asyncio.wait(
                {answer, poll, ended},
                timeout=self.policy.answer_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            poll.cancel()
            ended.cancel()
        if watch.answer.done():
            return watch.answer.result()
        if poll.done() and not poll.cancelled() and poll.result():
            return str(poll.result())
        if states.is_terminal(watch.status):
            return None
        raise _Failure("media_no_answer")

    async def _poll_answer(self, pilot_call_id: str) -> str:
        while True:
            try:
                call = await self._client.get_call(pilot_call_id, include_sdp=True)
            except PilotStatusError as err:
                log.info("answer poll %s: %s", pilot_call_id, describe(err).code)
            else:
                if call.sdp_answer:
                    return call.sdp_answer
                if states.is_terminal(call.status.value):
                    await self._tracker.apply_call(call, source="poll")
                    return ""
            await asyncio.sleep(self.policy.answer_poll_interval)

    async def _picked_up(self, record: CallRecord, watch: _Watch) -> bool:
        """Whether the callee answered; an unanswered call is ended as missed."""
        if await watch.until(_answered, self.policy.ring_timeout):
            return watch.status == "ACCEPTED"
        await self._end(record, "MISSED", None)
        return False

    async def _unless_ended(
        self, watch: _Watch, step: Coroutine[Any, Any, Any]
    ) -> tuple[bool, Any]:
        """Run `step` unless the call ends first: (True, None) if it ended, else (False, result).
        A failure of the step is raised."""
        running: asyncio.Future[Any] = asyncio.ensure_future(step)
        ended: asyncio.Future[Any] = asyncio.ensure_future(watch.until(states.is_terminal))
        try:
            await asyncio.wait({running, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        if running.cancelled():
            return True, None
        return False, running.result()

    async def _drive_web(self, leg: VoiceLeg, record: CallRecord, watch: _Watch) -> None:
        assert record.pilot_call_id is not None
        if self._shelf is not None and await self._play_by_url(leg, record):
            # Pilot fetches and plays it once the call connects, then hangs up: the file stays
            # on the shelf until the call ends or the URL expires.
            await watch.until(states.is_terminal, self._shelf.ttl)
            return
        if not await self._picked_up(record, watch):
            return
        session = await self._client.realtime_session(record.pilot_call_id)
        stream = stream_pcm(session.url, await leg.audio(), rate=self.policy.realtime_rate)
        self._streaming += 1
        try:
            ended = (await self._unless_ended(watch, stream))[0]
        finally:
            self._streaming -= 1
        if not ended:
            await self._end(record, "COMPLETED", None, spoken=True)

    async def _play_by_url(self, leg: VoiceLeg, record: CallRecord) -> bool:
        """`/play` with `hangupAfterPlay`; the spec's field first, every documented name if that
        is refused (API.md D4). False when the API will not play it."""
        assert self._shelf is not None and record.pilot_call_id is not None
        audio = await leg.audio()
        url = await self._shelf.shelve(audio.wav())
        if url is None:
            return False
        leg.shelved = url
        for every_name in (False, True):
            try:
                await self._client.play(
                    record.pilot_call_id, url, hangup_after_play=True, every_name=every_name
                )
            except BadRequestError as err:
                log.info("play refused (%s); every_name=%s", err.code, every_name)
                continue
            await self._store.audit(
                "call.play",
                chat_id=record.chat_id,
                subject=record.id,
                detail={"seconds": round(audio.seconds, 1)},
            )
            return True
        return False

    async def _end(
        self, record: CallRecord, status: str, error_code: str | None, *, spoken: bool = False
    ) -> None:
        """Store how the call ended, then hang up (harmless if it already ended). Stored first,
        so the reason is not lost to a status a poll reads between the hang-up and the store."""
        assert record.pilot_call_id is not None
        await self._settle(record.pilot_call_id, status, error_code=error_code)
        if spoken or error_code:
            await self._store.audit(
                "call.spoken" if spoken else "call.media_failed",
                chat_id=record.chat_id,
                subject=record.id,
                detail={"error": error_code} if error_code else {"repeat": self.policy.repeat},
            )
        try:
            await self._client.terminate(record.pilot_call_id)
            call = await self._client.get_call(record.pilot_call_id)
        except PilotStatusError as err:
            log.info("terminate %s: %s", record.id, describe(err).code)
            return
        if call.duration_seconds is not None:
            await self._settle(record.pilot_call_id, status, duration=call.duration_seconds)

    async def _settle(
        self,
        pilot_call_id: str,
        status: str,
        *,
        error_code: str | None = None,
        duration: int | None = None,
    ) -> None:
        updated, changed = await self._store.apply_status(
            pilot_call_id,
            status,
            at=utcnow(),
            source="bot",
            duration_seconds=duration,
            error_code=error_code,
        )
        if updated is not None and changed:
            await self._tracker.changed(updated)

    async def end_orphans(self, started_before: datetime) -> int:
        """After a restart: calls an earlier process was speaking on lost their voice with it
        (a Meta call's peer connection; a web call's realtime stream, or the /play file on the
        in-memory shelf), so nobody can speak on them; hang them up and say why. Returns how
        many. With replicas, a call another running replica speaks on (its claim is alive) is
        left to it, and hung up only if that claim lapses before the call ends."""
        orphans = [
            record
            for record in await self._store.live_calls()
            if _has_voice(record)
            and record.created_at < started_before
            and record.id not in self._watches
        ]
        claimed = await self.relay.claimed([record.id for record in orphans])
        for record in orphans:
            if record.id not in claimed:
                await self._hang_up_orphan(record)
        if claimed:
            task = asyncio.create_task(self._watch_claims(claimed), name="orphan claims")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(orphans) - len(claimed)

    async def _hang_up_orphan(self, record: CallRecord) -> None:
        log.warning("call %s lost its media in a restart: hanging up", record.id)
        await self._end(record, "FAILED", "media_lost")

    async def _watch_claims(self, call_ids: set[str]) -> None:
        """Calls left to another replica: each is hung up if its claim lapses (that replica
        died with the media) before the call ends."""
        while call_ids:
            await asyncio.sleep(self.policy.claim_lapse)
            try:
                live = {r.id: r for r in await self._store.live_calls() if r.id in call_ids}
                lapsed = set(live) - await self.relay.claimed(sorted(live))
                for call_id in sorted(lapsed):
                    await self._hang_up_orphan(live[call_id])
            except Exception:
                log.exception("calls left to other replicas: check failed; trying again")
                continue
            call_ids = set(live) - lapsed

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LazyEndpoint:
    """The aiortc endpoint, imported on the first Meta call (not at start: a bot that never
    places one never pays for aiortc and PyAV)."""

    def __init__(self, stun_servers: tuple[str, ...] = ()) -> None:
        self._stun = stun_servers
        self._endpoint: MediaEndpoint | None = None

    async def open_session(self) -> MediaSession:
        if self._endpoint is None:
            # The first import takes ~0.3 s: in a thread, so the loop keeps serving others.
            module = await asyncio.to_thread(importlib.import_module, "bot.voice.webrtc")
            self._endpoint = module.AiortcEndpoint(self._stun)
        return await self._endpoint.open_session()
