"""twistd plugin: ``twistd -n dpatia-sps``.  One lazy statement: nothing is imported at scan time."""

from twisted.application.service import ServiceMaker

dpatia_sps = ServiceMaker(
    "dpatia-sps",
    "dpatia_daemon.simulator.tap",
    "Sectra DPAT SPS simulator (slides, callback API, web page) for dpatia",
    "dpatia-sps",
)
