// The events the example submits: a department's report about one resident, in the shape of
// the sample catalogue (config/catalogue.yaml). Three are valid; the last breaks two rules
// of its event type, so ingest rejects it with a field violation for each.
import { SubjectKind, type Subject } from "./gen/egret/common/v1/subject";
import { Event } from "./gen/egret/ingest/v1/ingest_service";

export function person(residentId: string): Subject {
  return { kind: SubjectKind.SUBJECT_KIND_PERSON, idScheme: "resident-id", idValue: residentId };
}

export interface SampleEvents {
  valid: Event[];
  invalid: Event;
}

/** Events of the library (the department the catalogue lets report library.* events). */
export function libraryEvents(prefix: string, residentId: string, now: Date = new Date()): SampleEvents {
  // Event time, not arrival time: an hour ago, so the entries count today.
  const occurredAt = new Date(now.getTime() - 60 * 60 * 1000);
  const subject = person(residentId);
  const event = (id: string, eventType: string, attributes: Event["attributes"]): Event =>
    Event.fromPartial({
      eventId: prefix + id,
      eventType,
      subject,
      occurredAt,
      attributes,
      evidenceUri: `https://records.example.gov/library/${prefix}${id}`,
    });
  return {
    valid: [
      // More than 30 days late: the sample rule library.late_return takes 3 points.
      event("late-1", "library.book_returned_late", { days_late: { intValue: 40 } }),
      // Late, but not by enough for any rule to fire.
      event("late-2", "library.book_returned_late", { days_late: { intValue: 12 } }),
      event("on-time-1", "library.book_returned", { on_time: { boolValue: true }, district: { stringValue: "Siming" } }),
    ],
    // days_late must be at least 1, and the type declares no attribute "shelf".
    invalid: event("bad-1", "library.book_returned_late", {
      days_late: { intValue: -2 },
      shelf: { stringValue: "A3" },
    }),
  };
}
