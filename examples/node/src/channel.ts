// TLS with a bearer token per role, and unary calls that always carry a deadline.
import {
  credentials,
  Metadata,
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientUnaryCall,
  type ServiceError,
} from "@grpc/grpc-js";

import type { Config } from "./config";

/** TLS against the configured CA (with the client certificate when given) plus
 * `authorization: Bearer <token>` on every call. */
export function channelCredentials(config: Config, token: string): ChannelCredentials {
  const tls = credentials.createSsl(config.ca, config.clientKey ?? null, config.clientCert ?? null);
  const bearer = credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    callback(null, metadata);
  });
  return credentials.combineChannelCredentials(tls, bearer);
}

export function channelOptions(config: Config): ChannelOptions {
  return config.serverName ? { "grpc.ssl_target_name_override": config.serverName } : {};
}

type Unary<Request, Response> = (
  request: Request,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Response) => void,
) => ClientUnaryCall;

/** Calls a unary method of a generated client with a deadline `deadlineMs` from now. Every
 * Egret call should have one, and ingest refuses a call without one (INVALID_ARGUMENT). */
export function call<Request, Response>(
  method: Unary<Request, Response>,
  request: Request,
  deadlineMs: number,
): Promise<Response> {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineMs);
    method(request, new Metadata(), { deadline }, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number";
}
