"""The work-folder contract: the files of one job's private folder, by name.

The daemon creates the folder and writes the job record; the worker's pipeline fills it
(metadata, thumbnail, label, the slide's files) and the analysis leaves its result
there.  Both sides, and the retention of ended jobs' folders, name the files only
through these constants.  A leaf module: it imports nothing, so the pipeline (a lower
layer than the workers) may read it.
"""

from __future__ import annotations

#: In a job's work folder: the job record the daemon writes before dispatch (0600: it
#: holds the callback token) and the worker reads.
JOB_FILE = "job.json"
#: In a job's work folder: the final result the worker writes, as
#: ``{"jobId": ..., "result": <Result JSON>, "resultContent": <text>}``; its path is
#: RunJob's answer.
RESULT_FILE = "result.json"
#: In ``result.json``: the result's ``data.result.content`` serialised to a JSON text
#: (a string), taken out of ``result``.  Parsing a string is quick, and the daemon
#: sends the text to the SPS as it is; absent (older workers), the content is inline.
CONTENT_KEY = "resultContent"
#: In a job's work folder, optional: slide metadata fetched by a pipeline step.
SLIDE_INFO_FILE = "slide_info.json"
#: In a job's work folder, optional: the case's slides (``slides/{id}/request/images/info``).
CASE_INFO_FILE = "case_info.json"
#: In a job's work folder, optional: the thumbnail, the label image (``label.<ext>``)
#: and the folder of downloaded WSI files, from the pipeline's steps.
THUMBNAIL_FILE = "thumbnail.png"
LABEL_STEM = "label"
WSI_DIR = "wsi"
