"""`tilerunner worker`: analyse slides as jobs arrive on a RabbitMQ queue.

The package, by subject (imports go down this list, never up):

    serve.py      entry point: check the folders, load the models once, serve metrics, run
    consumer.py   the main loop: connection, consuming, one job at a time, what each ends in
    replies.py    answering a delivery: result, retry, hand-back or dead letter; ack last
    jobrunner.py  one job in the job thread: admit, lock, reuse or compute, commit
    store.py      where results live: allowed folders, job-id locks and identity, commits
    results.py    outcomes of an attempt and the result messages
    topology.py   the queues, the headers kept on jobs, one delivery and its counts
    jobs.py       job messages: schema, parsing, the job's exceptions
    metrics.py    Prometheus metrics, /healthz and /readyz
    logs.py       one-line reasons and the log formatters

What the worker promises (the README's "Worker mode" has the details):

- A job is acknowledged only after its results are durable (fsynced, renamed into place) and
  its result message is confirmed by the broker: at least once, never lost.
- A job id names one job: complete results of the same job are reused, another job under a
  used id is refused and its refusal reported under the refused message's identity
  (`job_id` null, `message_id`), never as a status of the job that owns the id.
- Failures and deliveries are counted apart. An attempt that fails with an error counts
  against --max-attempts (permanent errors are dead-lettered at once). A delivery cut short
  with no answer (a broker restart, a lost connection, a worker that died) is not a failure;
  the broker counts those per copy of the job up to a generous --delivery-limit, the backstop
  for a slide that kills every worker. So broker restarts during a long job use up none of
  its attempts: the job finishes, commits, and its redelivery is answered from the results.
- Every dead letter has a `failed` result, whoever gave the job up: the worker (malformed,
  permanent error, too many failures) or the broker (delivery limit: the workers consume
  NAME.undelivered and answer for it).
"""
