"""The SPS side, for tests, development, demos and vendors without a PACS.

- :mod:`.fake` — ``FakeSPS``, the callback API of IA-API.md §2 in memory (Klein).
- :mod:`.slides` — synthetic pyramidal TIFF slides with known tissue, and their manifest.
- :mod:`.tiles` — DZI tiles and thumbnails from those pyramids, off the reactor thread.
- :mod:`.faults` — fault injection and the streamed ``files`` download.
- :mod:`.driver` — calls an app as an SPS does: registration, invocations, notifications.
- :mod:`.overlay`, :mod:`.page` — a result drawn over a thumbnail (PNG, and the web page).
- :mod:`.server` — the simulator wired together and its service; :mod:`.tap` for twistd.
- :mod:`.process`, :mod:`.daemon_process` — run the simulator or the daemon as a child.
- ``python -m dpatia_daemon.simulator`` — the command line (:mod:`.__main__`).
"""
