"""The words the failure catalog may use: metric names and mitigation actions.

``config/failures.toml`` is checked against these two tables when it is
loaded (``config.load_catalog(path, metrics=METRICS, mitigations=MITIGATIONS)``),
so a catalog row can only name a metric some actor exports and an action some
actor performs. This is the one place later issues extend when they build an
actor: add its metrics and actions here, then flip the row's ``built`` flag.

Metric naming follows the catalog's conventions (see ``config.catalog``):
counters end in ``_total``, ratios in ``_ratio`` (exported as
``<name>_numerator_total`` / ``<name>_denominator_total``), event ages are gauges
of Unix time ending in ``_timestamp_seconds``.

These are constant tables, not runtime registries: nothing registers into them.
"""

from __future__ import annotations

from typing import Final

__all__ = ["METRICS", "MITIGATIONS"]

#: metric name -> help text (as the Prometheus exporter will describe it)
METRICS: Final[dict[str, str]] = {
    "triage_sms_provider_error_ratio": (
        "Share of SMS provider calls that failed (5xx, timeout, refused), per provider adapter"
    ),
    "triage_push_feedback_last_timestamp_seconds": (
        "Unix time of the newest FCM/APNs delivery feedback received, or of the last"
        " moment no push waited for feedback"
    ),
    "triage_email_bounce_ratio": "Share of sent emails that bounced, per tenant and category",
    "triage_virtual_session_failed_total": "Virtual-care sessions that failed to start or dropped",
    "triage_db_connection_errors_total": "Failed PostgreSQL connection attempts and lost connections",
    "triage_outbox_oldest_pending_timestamp_seconds": (
        "Unix time of the oldest event still pending in the outbox (now when none is pending)"
    ),
    "triage_idempotency_cache_hit_ratio": "Share of idempotency-key lookups answered by Redis",
    "triage_scan_queue_depth": "Attachments waiting for an antivirus scan",
    "triage_outbox_relay_restarts_total": "Restarts of the outbox relay actor by its supervisor",
    "triage_join_token_verify_failures_total": "Virtual-room join tokens that failed verification",
    "triage_phi_guard_hits_total": "Push payloads stopped by the pre-send PHI guard or log scanner",
    "triage_tenant_check_violations_total": (
        "Cross-tenant writes refused by row-level security or the application check"
    ),
    "triage_dlr_callbacks_total": "Delivery-receipt callbacks received from SMS providers",
    "triage_fallback_initiated_total": "Fallback message threads spawned after a failed virtual visit",
    "triage_erasure_residue_total": "Rows with personal data found by the GDPR erasure reconciler",
    "triage_clock_skew_seconds": "Absolute skew between the host clock and the database clock",
    "triage_upload_oversize_rejected_total": "Uploads refused with 413 for exceeding the size cap",
    "triage_inbox_duplicates_total": "Redelivered scheduling events dropped by the inbox dedupe",
    "triage_template_not_found_total": "Dispatches refused because their template version is missing",
    "triage_recording_failed_total": "Recording ingests that failed (recording.failed events)",
}

#: action name -> what the mitigation does
MITIGATIONS: Final[dict[str, str]] = {
    "alert": "Send an alert to the alert sink (ticket-level unless the row's severity pages)",
    "page_oncall": "Page the on-call engineer now",
    "open_incident": "Open an incident record with the detector's evidence attached",
    "failover_provider": "Route sends to the secondary provider while the primary's breaker is open",
    "retry_with_backoff": "Retry the failed operation with exponential backoff and jitter",
    "force_refresh_feedback": "Restart the feedback consumer to force a fresh feedback session",
    "mark_stale_unknown": "Mark dispatches whose feedback never arrived as delivery status unknown",
    "throttle_category": "Lower the send rate of the affected tenant and message category",
    "disable_category_for_tenant": "Stop sending the affected category for the affected tenant",
    "spawn_fallback_thread": "Open a secure message thread in place of the failed virtual visit",
    "failover_jitsi_pool": "Take the failing Jitsi node out of the pool and use the others",
    "replica_read_mode": "Serve reads from the replica while the primary is unavailable",
    "spool_writes": "Spool writes durably and replay them once the primary is back",
    "retain_outbox": "Keep events in the outbox until they are acknowledged by JetStream",
    "replay_outbox": "Replay the outbox backlog once NATS is reachable again",
    "idempotency_db_fallback": "Fail open to the database unique key for idempotency checks",
    "warm_cache": "Reload recent idempotency keys into Redis",
    "scale_scanners": "Start more antivirus scan workers, up to the bulkhead's capacity",
    "block_large_uploads": "Refuse new large uploads until the scan queue drains",
    "quarantine_poison_event": "Find the event that crashes the relay and move it to the DLQ",
    "restart_relay": "Restart the outbox relay after the poison event is quarantined",
    "rotate_join_key": "Rotate the join-token signing key",
    "revoke_sessions": "Revoke virtual-room sessions admitted with the suspect key",
    "halt_category": "Stop sending the affected message category",
    "retire_template_version": "Retire the template version that produced the payload",
    "reject_cross_tenant": "Refuse the cross-tenant write (row-level security and app check)",
    "rate_limit_callbacks": "Rate-limit delivery-receipt callbacks per provider",
    "shed_load": "Refuse excess work fast with a typed error instead of queueing it",
    "scale_workers": "Start more DLR worker actors",
    "open_patient_day_breaker": "Open the per-patient-per-day breaker on fallback threads",
    "replay_erasure_saga": "Replay the erasure saga for the subject with residual data",
    "use_safe_clock": "Order read receipts by the database clock instead of the host clock",
    "reject_oversize_upload": "Refuse uploads over the size cap before buffering them (413)",
    "dedupe_inbox": "Drop redelivered events by their (tenant, appointment_id) key",
    "fail_closed": "Refuse the dispatch instead of sending with a missing template",
    "ops_notice": "Show the internal-ops notice about the failing dispatches",
    "dead_letter": "Move the item to the dead-letter queue after its retry budget",
}
