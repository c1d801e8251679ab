"""One place that builds the workers from a config: the daemon runs them all, `upload` drives a few by hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import Config
from .finisher import ACTION_RETRY_POLICY, Finisher
from .indexer import CallbackListener, Indexer, callback_token, callback_url
from .ledger import Ledger
from .metrics import Metrics
from .pacing import Gate, Pacer, RetryPolicy
from .recorder import Recorder
from .scanner import Scanner
from .settler import Settler
from .uploader import Client
from .watcher import Watcher
from .worker import Events, UploadWorker, Worker


@dataclass
class Pipeline:
    """Every part of a daemon, built and wired but not started."""

    events: Events
    metrics: Metrics
    gate: Gate
    pacer: Pacer
    recorder: Recorder
    watcher: Watcher | None
    scanner: Scanner
    settler: Settler
    uploaders: list[UploadWorker]
    finisher: Finisher
    indexer: Indexer | None
    callbacks: CallbackListener | None

    @property
    def workers(self) -> list[Worker]:
        """The workers that each run in a thread of their own, in the order they start."""
        return [
            self.scanner,
            self.settler,
            *self.uploaders,
            self.finisher,
            *(worker for worker in (self.indexer, self.callbacks) if worker is not None),
        ]


def build(
    config: Config,
    ledger: Ledger,
    client: Client,
    *,
    events: Events,
    policy: RetryPolicy,
    clock: Callable[[], float],
    watch: bool,
    index: bool,
) -> Pipeline:
    """Build the workers. Without watch, no observers (only scans); without index, no indexer and no listener.

    Raises ListenFailed when index is asked for and the callback listener cannot listen.
    """
    metrics = Metrics()
    gate = Gate(ledger, account_check_seconds=config.upload.account_check_seconds, key_id=client.key_id, clock=clock)
    pacer = Pacer(ledger, config.upload.rate_per_second)
    recorder = Recorder(config, ledger, events.wake)
    # The watcher asks the scanner to look at a directory again; the scanner refreshes the watcher's mounts.
    watcher = Watcher(config, recorder, lambda path: scanner.request(path)) if watch else None
    scanner = Scanner(stop=events.stop, config=config, recorder=recorder, watcher=watcher)
    settler = Settler(config=config, ledger=ledger, events=events, clock=clock)
    uploaders = _uploaders(
        config, ledger, client, events=events, metrics=metrics, gate=gate, pacer=pacer, policy=policy, clock=clock
    )
    finisher = Finisher(
        stop=events.stop,
        config=config,
        ledger=ledger,
        wake=events.actions_ready,
        policy=ACTION_RETRY_POLICY,
        clock=clock,
    )
    indexer, callbacks = _indexing(config, ledger, client, events) if index else (None, None)
    return Pipeline(
        events, metrics, gate, pacer, recorder, watcher, scanner, settler, uploaders, finisher, indexer, callbacks
    )


def _uploaders(
    config: Config,
    ledger: Ledger,
    client: Client,
    *,
    events: Events,
    metrics: Metrics,
    gate: Gate,
    pacer: Pacer,
    policy: RetryPolicy,
    clock: Callable[[], float],
) -> list[UploadWorker]:
    """As many uploaders as the config asks for, sharing one gate, one pace and one callback URL."""
    public_url = config.indexing.public_url
    url = callback_url(public_url, callback_token(ledger)) if public_url else None
    return [
        UploadWorker(
            number=number,
            config=config,
            ledger=ledger,
            client=client,
            pacer=pacer,
            gate=gate,
            events=events,
            metrics=metrics,
            callback_url=url,
            policy=policy,
            clock=clock,
        )
        for number in range(1, config.upload.workers + 1)
    ]


def _indexing(
    config: Config, ledger: Ledger, client: Client, events: Events
) -> tuple[Indexer | None, CallbackListener | None]:
    poll_seconds, listen = config.indexing.poll_seconds, config.indexing.listen
    if not (poll_seconds or listen):
        return None, None
    indexer = Indexer(stop=events.stop, ledger=ledger, client=client, poll_seconds=poll_seconds)
    if not listen:
        return indexer, None
    return indexer, CallbackListener(
        stop=events.stop, ledger=ledger, indexer=indexer, listen=listen, token=callback_token(ledger)
    )
