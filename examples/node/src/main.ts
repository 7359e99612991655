// Egret from Node.js: submit events as a department, see a refusal's rich error details, read
// a score as a reviewer. Prints one JSON object per line (README.md describes them) and exits
// non-zero on anything unexpected.
import { status as Code, type ServiceError } from "@grpc/grpc-js";

import { call, channelCredentials, channelOptions, isServiceError } from "./channel";
import { ConfigError, loadConfig, type Config } from "./config";
import { decodeError } from "./errorDetails";
import { libraryEvents, person, type SampleEvents } from "./events";
import {
  EventStatus,
  eventStatusToJSON,
  IngestServiceClient,
  SubmitEventRequest,
  SubmitEventsRequest,
} from "./gen/egret/ingest/v1/ingest_service";
import { GetScoreRequest, QueryServiceClient, type Score } from "./gen/egret/query/v1/query_service";

/** A result the example did not expect: printed, and the exit status is 1. */
class Unexpected extends Error {}

function emit(step: string, fields: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify({ step, ...fields })}\n`);
}

async function submitEvents(ingest: IngestServiceClient, config: Config, events: SampleEvents): Promise<void> {
  const batch = [...events.valid, events.invalid];
  const response = await call(
    ingest.submitEvents.bind(ingest),
    SubmitEventsRequest.fromPartial({ source: config.department, events: batch }),
    config.deadlineMs,
  );
  const problems: string[] = [];
  for (const result of response.results) {
    emit("submit", {
      index: result.index,
      event_id: result.eventId,
      status: eventStatusToJSON(result.status),
      message: result.message,
      violations: result.violations.map(({ field, reason, description }) => ({ field, reason, description })),
    });
    const shouldFail = result.eventId === events.invalid.eventId;
    // A duplicate is a resend of an event already committed: as good as accepted.
    const ok = shouldFail
      ? result.status === EventStatus.EVENT_STATUS_REJECTED && result.violations.length > 0
      : result.status === EventStatus.EVENT_STATUS_ACCEPTED || result.status === EventStatus.EVENT_STATUS_DUPLICATE;
    if (!ok) problems.push(`${result.eventId}: ${eventStatusToJSON(result.status)}`);
  }
  emit("submit_counts", { ...response.counts });
  if (response.results.length !== batch.length) {
    problems.push(`${response.results.length} results for ${batch.length} events`);
  }
  if (problems.length > 0) throw new Unexpected(`unexpected event results: ${problems.join(", ")}`);
}

/** SubmitEvent (one event) answers a malformed event with INVALID_ARGUMENT, the field
 * violations in a google.rpc.BadRequest detail of the status trailer. */
async function showRefusal(ingest: IngestServiceClient, config: Config, events: SampleEvents): Promise<void> {
  const rpc = "egret.ingest.v1.IngestService/SubmitEvent";
  let refusal: ServiceError;
  try {
    await call(
      ingest.submitEvent.bind(ingest),
      SubmitEventRequest.fromPartial({ source: config.department, event: events.invalid }),
      config.deadlineMs,
    );
    throw new Unexpected(`${rpc} accepted an invalid event`);
  } catch (error) {
    if (!isServiceError(error)) throw error;
    refusal = error;
  }
  const decoded = decodeError(refusal);
  emit("error_details", { rpc, ...decoded });
  if (refusal.code !== Code.INVALID_ARGUMENT) {
    throw new Unexpected(`${rpc}: ${decoded.code} (${decoded.message}), expected INVALID_ARGUMENT`);
  }
  const badRequest = decoded.details.find((detail) => detail.type === "google.rpc.BadRequest");
  if (!badRequest || !("field_violations" in badRequest) || badRequest.field_violations.length === 0) {
    throw new Unexpected(`${rpc}: INVALID_ARGUMENT without google.rpc.BadRequest field violations`);
  }
}

/** GetScore as a reviewer stating a purpose. Events reach the score asynchronously (ingest →
 * rules → score), so a subject Egret holds nothing for yet is NOT_FOUND for a moment. */
async function readScore(query: QueryServiceClient, config: Config): Promise<Score> {
  const request = GetScoreRequest.fromPartial({
    subject: { subject: person(config.subjectId) },
    purpose: config.purpose,
  });
  const giveUpAt = Date.now() + config.scoreWaitMs;
  for (let attempt = 1; ; attempt++) {
    try {
      const response = await call(query.getScore.bind(query), request, config.deadlineMs);
      if (!response.score) throw new Unexpected("GetScore answered without a score");
      return response.score;
    } catch (error) {
      const notYet = isServiceError(error) && error.code === Code.NOT_FOUND;
      if (!notYet || Date.now() > giveUpAt) throw error;
      await new Promise((resolve) => setTimeout(resolve, Math.min(100 * attempt, 1000)));
    }
  }
}

async function main(): Promise<number> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    emit("config", { ok: false, error: error.message });
    return 2;
  }
  const ingest = new IngestServiceClient(
    config.ingestAddress,
    channelCredentials(config, config.departmentToken),
    channelOptions(config),
  );
  const query = new QueryServiceClient(
    config.queryAddress,
    channelCredentials(config, config.reviewerToken),
    channelOptions(config),
  );
  try {
    const events = libraryEvents(config.eventIdPrefix, config.subjectId);
    await submitEvents(ingest, config, events);
    await showRefusal(ingest, config, events);
    const score = await readScore(query, config);
    emit("score", {
      purpose: config.purpose,
      subject_key: score.subjectKey,
      score: score.score,
      tier: score.tier,
      entry_count: score.entryCount,
      policy_version: score.policyVersion,
      categories: score.categories.map(({ category, points }) => ({ category, points })),
      lists: score.lists.map((list) => list.listName),
    });
    emit("done", { ok: true });
    return 0;
  } catch (error) {
    const detail = isServiceError(error) ? decodeError(error) : { message: String(error) };
    emit("done", { ok: false, unexpected: error instanceof Unexpected ? error.message : detail });
    return 1;
  } finally {
    ingest.close();
    query.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  },
);
