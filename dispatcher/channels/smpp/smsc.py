"""A local SMSC on smpp34's server: ``dispatcher smsc`` for trying SMPP, and the tests' SMSC.

It accepts binds and ``submit_sm``, answers each as a script says (accept,
reject with a status, answer late, never answer, drop the session), sends
delivery receipts (TLVs and text) before or after the ``submit_sm_resp``, and
can send mobile-originated messages, including a reply to every message when
started with ``--reply``. It is not ours: the SMPP side is smpp34's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import smpp34

from dispatcher.channels.smpp import pdu
from dispatcher.channels.smpp.aio import run_until
from dispatcher.db import utcnow

logger = logging.getLogger(__name__)
T = TypeVar("T")

STATE_CODES = {name: code for code, name in pdu.MESSAGE_STATES.items()}


@dataclass(frozen=True)
class Submit:
    """One submit_sm as the SMSC received it."""

    seq: int
    session_id: str
    system_id: str
    source_addr: str
    source_addr_ton: int
    source_addr_npi: int
    destination_addr: str
    dest_addr_ton: int
    dest_addr_npi: int
    esm_class: int
    data_coding: int
    registered_delivery: int
    short_message: bytes

    def text(self) -> tuple[pdu.Concat | None, str]:
        """This part's concatenation header and its decoded text."""
        concat, payload = pdu.split_udh(self.short_message, self.esm_class)
        return concat, pdu.decode_text(payload, self.data_coding)


@dataclass(frozen=True)
class Action:
    """How the SMSC answers one submit_sm."""

    status: int = 0
    delay: float = 0.0
    # Never answer (the ESME's response timer or a dropped session settles it).
    hold: bool = False
    # End the session instead of answering, with every held submit unanswered.
    drop: bool = False
    # The receipt's stat, or None for no receipt.
    receipt: str | None = "DELIVRD"
    receipt_delay: float = 0.0
    # Send the receipt before the submit_sm_resp (a fast carrier).
    receipt_first: bool = False


Script = Callable[[Submit], Action]


def accept_all(_: Submit) -> Action:
    return Action()


@dataclass
class LocalSmsc:
    host: str = "127.0.0.1"
    port: int = 2775
    script: Script = accept_all
    receipt_delay: float = 0.0
    # Receipts carry receipted_message_id/message_state TLVs (else the text alone).
    receipt_tlvs: bool = True
    # Answer every delivered message with an MO from its destination (the demo).
    reply: bool = False
    system_id: str = "LocalSMSC"
    submits: list[Submit] = field(default_factory=list)
    accepted: dict[str, Submit] = field(default_factory=dict)
    binds: list[str] = field(default_factory=list)
    sessions: dict[str, Any] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _references: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _held: list[Any] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: Any = None
    _stopped: asyncio.Event | None = None
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    async def serve(self) -> None:
        """Run until :meth:`stop` (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = smpp34.Server(host=self.host, port=self.port, system_id=self.system_id)
        await self._server.start()
        logger.info("local SMSC listening on %s:%s", self.host, self.port)

        async def pump() -> None:
            while True:
                self._on_event(await self._server.next())

        try:
            await run_until(pump(), self._stopped)
        finally:
            for task in list(self._tasks):
                task.cancel()
            # The listener first: an ESME rebinds as soon as its session ends, and one that
            # bound between the unbinds and the listener's end kept a session nobody served.
            await self._server.stop()
            for esme in list(self.sessions.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(esme.unbind(), 1)

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("local SMSC: %r", task.exception())

    def _on_event(self, event: Any) -> None:
        if isinstance(event, smpp34.Esme):
            self.sessions[event.session_id] = event
            self.binds.append(event.system_id)
        elif isinstance(event, smpp34.Unbound):
            self.sessions.pop(event.session_id, None)
        elif isinstance(event, smpp34.SubmitSmEvent):
            esme = self.sessions.get(event.session_id)
            submit = Submit(
                seq=len(self.submits) + 1,
                session_id=event.session_id,
                system_id=esme.system_id if esme else "",
                source_addr=event.source_addr,
                source_addr_ton=event.source_addr_ton,
                source_addr_npi=event.source_addr_npi,
                destination_addr=event.destination_addr,
                dest_addr_ton=event.dest_addr_ton,
                dest_addr_npi=event.dest_addr_npi,
                esm_class=event.esm_class,
                data_coding=event.data_coding,
                registered_delivery=event.registered_delivery,
                short_message=event.short_message,
            )
            self.submits.append(submit)
            action = self.script(submit)
            if action.drop or action.hold or action.delay or action.receipt_first or self.reply:
                self._spawn(self._answer(event, submit, action))
            else:
                self._answer_now(event, submit, action)

    def _answer_now(self, event: Any, submit: Submit, action: Action) -> None:
        """Answer at once, the receipt on a timer: no task per submit (the usual script)."""
        if action.status:
            event.reject(action.status)
            return
        message_id = f"{next(self._ids):010d}"
        self.accepted[message_id] = submit
        event.accept(message_id)
        if submit.registered_delivery & 0x03 and action.receipt is not None:
            assert self._loop is not None
            self._loop.call_later(
                action.receipt_delay or self.receipt_delay,
                self._post_receipt,
                submit,
                message_id,
                action,
            )

    def _post_receipt(self, submit: Submit, message_id: str, action: Action) -> None:
        sent = self._receipt_call(submit, message_id, action)
        if sent is not None:
            asyncio.ensure_future(sent).add_done_callback(self._logged)

    @staticmethod
    def _logged(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is not None:
            logger.warning("local SMSC: %r", done.exception())

    async def _answer(self, event: Any, submit: Submit, action: Action) -> None:
        if action.drop:
            esme = self.sessions.pop(submit.session_id, None)
            self._held.append(event)
            if esme is not None:
                await esme.unbind()
            return
        if action.hold:
            self._held.append(event)
            return
        if action.status:
            if action.delay:
                await asyncio.sleep(action.delay)
            event.reject(action.status)
            return
        message_id = f"{next(self._ids):010d}"
        self.accepted[message_id] = submit
        wants_receipt = bool(submit.registered_delivery & 0x03) and action.receipt is not None
        if wants_receipt and action.receipt_first:
            await self._receipt(submit, message_id, action)
        if action.delay:
            await asyncio.sleep(action.delay)
        event.accept(message_id)
        if wants_receipt and not action.receipt_first:
            await asyncio.sleep(action.receipt_delay or self.receipt_delay)
            await self._receipt(submit, message_id, action)
        if self.reply and action.receipt == "DELIVRD":
            _, text = submit.text()
            await self.send_mo(
                source=submit.destination_addr,
                destination=submit.source_addr,
                text=f"Re: {text[:60]}",
                system_id=submit.system_id,
            )

    def _receiver(self, system_id: str) -> Any:
        for esme in self.sessions.values():
            if esme.system_id == system_id and esme.can_receive:
                return esme
        return None

    async def _receipt(self, submit: Submit, message_id: str, action: Action) -> None:
        sent = self._receipt_call(submit, message_id, action)
        if sent is not None:
            await sent

    def _receipt_call(
        self, submit: Submit, message_id: str, action: Action
    ) -> Awaitable[Any] | None:
        """The receipt's deliver_sm, sent (None if no receiver is bound)."""
        stat = action.receipt or "DELIVRD"
        # To the minute, as receipts carry it (and the date's text is cached per minute).
        now = utcnow().replace(second=0, microsecond=0)
        text = pdu.receipt_text(message_id=message_id, stat=stat, submitted=now, done=now)
        tlvs = (
            [
                smpp34.Tlv(pdu.TLV_RECEIPTED_MESSAGE_ID, message_id.encode() + b"\0"),
                smpp34.Tlv(pdu.TLV_MESSAGE_STATE, bytes((STATE_CODES[stat],))),
            ]
            if self.receipt_tlvs
            else []
        )
        esme = self._receiver(submit.system_id)
        if esme is None:
            logger.warning(
                "local SMSC: no receiver bound for %s; receipt dropped", submit.system_id
            )
            return None
        return esme.deliver_sm(
            submit.source_addr,
            text.encode(),
            source_addr=submit.destination_addr,
            source_addr_ton=1,
            source_addr_npi=1,
            esm_class=pdu.ESM_RECEIPT,
            tlvs=tlvs,
        )

    async def send_mo(
        self,
        *,
        source: str,
        destination: str,
        text: str,
        system_id: str | None = None,
    ) -> int:
        """Send a mobile-originated message (split and concatenated if long); returns parts."""
        esme = (
            self._receiver(system_id)
            if system_id
            else next((e for e in self.sessions.values() if e.can_receive), None)
        )
        if esme is None:
            raise RuntimeError("no ESME bound to receive")
        # Each long MO has its own reference, as a handset gives it.
        encoded = pdu.encode_body(text, reference=next(self._references) & 0xFF)
        for payload in encoded.payloads:
            resp = await esme.deliver_sm(
                destination,
                payload,
                source_addr=source.lstrip("+"),
                source_addr_ton=1 if source.startswith("+") else 0,
                source_addr_npi=1,
                dest_addr_ton=1 if destination.isdigit() else 5,
                esm_class=encoded.esm_class,
                data_coding=encoded.data_coding,
            )
            if not resp.is_success:
                raise RuntimeError(f"deliver_sm refused: {resp.command_status:#x}")
        return len(encoded.payloads)

    # -- running in a thread (tests, the bench) ----------------------------------

    def post_mo(self, **mo: Any) -> None:
        """Send an MO (``send_mo``'s arguments) without waiting for its deliver_sm_resp.

        smpp34's server does not take a receiver session's deliver_sm_resp (it answers
        generic_nack, ESME_RINVCMDID) and fails the deliver_sm after its own timeout,
        though the ESME got the message: over a receiver bind nothing can be awaited.
        """
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._spawn(self.send_mo(**mo)))

    def post_receipt(self, message_id: str, stat: str = "DELIVRD") -> None:
        """Send an accepted message's receipt now, again if it went already (as an SMSC
        does whose deliver_sm_resp was lost or late), without waiting for its resp."""
        assert self._loop is not None
        action = Action(receipt=stat)
        self._loop.call_soon_threadsafe(
            self._post_receipt, self.accepted[message_id], message_id, action
        )

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the SMSC's loop from another thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def release_held(self) -> int:
        """Forget held submits (their sessions are gone or the test is over)."""
        n = len(self._held)
        self._held.clear()
        return n


@contextlib.contextmanager
def running(smsc: LocalSmsc) -> Iterator[LocalSmsc]:
    """Run ``smsc`` in a thread of its own for the duration of the block."""
    ready = threading.Event()
    failure: list[BaseException] = []

    def _main() -> None:
        async def go() -> None:
            task = asyncio.ensure_future(smsc.serve())
            while smsc._stopped is None and not task.done():
                await asyncio.sleep(0.01)
            ready.set()
            await task

        try:
            asyncio.run(go())
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=_main, name=f"smsc-{smsc.port}", daemon=True)
    thread.start()
    ready.wait(10)
    if failure:
        raise failure[0]
    try:
        yield smsc
    finally:
        smsc.stop()
        thread.join(15)
