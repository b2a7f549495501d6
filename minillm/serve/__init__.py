"""A teacher served over HTTP (``minillm-teacher-serve``) and the trainer's side of it (``teacher.server``).

* :mod:`.protocol` — the wire format (safetensors bodies, option names) and the tokenizer fingerprint both ends
  compute; imports only torch and safetensors.
* :mod:`.server` — the Starlette app that scores batches with the full teacher (one batch at a time per process).
* :mod:`.client` — an HTTP client over one or several server URLs: timeouts, retries with exponential backoff,
  round-robin; :class:`.client.TeacherServerUnavailable` when every try failed.
* :mod:`.remote` — :class:`.remote.RemoteTeacher`, a module holding only the teacher's LM head, whose forward asks
  the server for the final hidden states and applies the head locally, so every trainer path that calls a teacher
  model works unchanged and the chunked losses are exact.

Nothing here is imported by ``import minillm``; the server's web libraries (``pip install minillm-distill[serve]``)
are imported only by :mod:`.server`.
"""
