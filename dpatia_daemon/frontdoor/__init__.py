"""The daemon's HTTP side, run by the main process and by every extra front-door copy:
the Klein routes of the IA-API (``routes``), the site around them and the one mapping of
errors to HTTP (``site``), where and how it listens (``listening``), the background SPS
writes that follow an acknowledgement (``background``), the notification rules
(``notifications``), whether the spool has room for new jobs (``capacity``), and the
extra front-door processes (``processes``)."""
