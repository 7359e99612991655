// Rich error details: Egret's services send a google.rpc.Status, serialized, in the
// `grpc-status-details-bin` trailer of a failed call. Its `details` are google.protobuf.Any
// messages: google.rpc.BadRequest (field violations) for INVALID_ARGUMENT, ErrorInfo (a
// machine-readable reason) for ALREADY_EXISTS and FAILED_PRECONDITION, RetryInfo for
// RESOURCE_EXHAUSTED.
import { status as Code, type ServiceError } from "@grpc/grpc-js";

import type { Any } from "./gen/google/protobuf/any";
import { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";

export const STATUS_DETAILS_TRAILER = "grpc-status-details-bin";

export interface FieldViolation {
  field: string;
  reason: string;
  description: string;
}

// Keys as the protos name the fields, so that the printed lines read like the contracts.
export type Detail =
  | { type: "google.rpc.BadRequest"; field_violations: FieldViolation[] }
  | { type: "google.rpc.ErrorInfo"; reason: string; domain: string; metadata: Record<string, string> }
  | { type: "google.rpc.RetryInfo"; retry_delay_seconds: number }
  | { type: string };

export interface DecodedError {
  code: string;
  message: string;
  /** False when the trailer is absent: the status carries no details. */
  has_details: boolean;
  details: Detail[];
}

/** The status of a failed call with its details decoded. */
export function decodeError(error: ServiceError): DecodedError {
  const code = Code[error.code] ?? String(error.code);
  // The trailer holds bytes (a `-bin` key); grpc-js returns it as a Buffer.
  const [raw] = error.metadata?.get(STATUS_DETAILS_TRAILER) ?? [];
  if (!(raw instanceof Buffer)) {
    return { code, message: error.details, has_details: false, details: [] };
  }
  const status = Status.decode(raw);
  return { code, message: status.message, has_details: true, details: status.details.map(decodeDetail) };
}

function decodeDetail(detail: Any): Detail {
  // A type URL is "type.googleapis.com/<full message name>".
  const type = detail.typeUrl.slice(detail.typeUrl.lastIndexOf("/") + 1);
  switch (type) {
    case "google.rpc.BadRequest":
      return {
        type,
        field_violations: BadRequest.decode(detail.value).fieldViolations.map(({ field, reason, description }) => ({
          field,
          reason,
          description,
        })),
      };
    case "google.rpc.ErrorInfo": {
      const info = ErrorInfo.decode(detail.value);
      return { type, reason: info.reason, domain: info.domain, metadata: info.metadata };
    }
    case "google.rpc.RetryInfo": {
      const delay = RetryInfo.decode(detail.value).retryDelay;
      return { type, retry_delay_seconds: (delay?.seconds ?? 0) + (delay?.nanos ?? 0) / 1e9 };
    }
    default:
      return { type };
  }
}
