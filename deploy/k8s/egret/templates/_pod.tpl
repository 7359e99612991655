{{/*
The OpenTelemetry settings of one workload, as a JSON object (. = dict root, service): its
service name, resource attributes (the pod's K8S_NAMESPACE and K8S_POD_NAME by $(VAR)
expansion), the sampler, and the exporter when otel.enabled. Shared by the services and the portal.
*/}}
{{- define "egret.otelSettings" -}}
{{- $root := .root -}}
{{- $settings := dict "OTEL_SERVICE_NAME" (printf "egret-%s" .service) "OTEL_TRACES_SAMPLER" $root.Values.otel.sampler -}}
{{- $attributes := list "service.namespace=egret" (printf "service.version=%s" (default $root.Chart.AppVersion $root.Values.image.tag)) "k8s.namespace.name=$(K8S_NAMESPACE)" "k8s.pod.name=$(K8S_POD_NAME)" -}}
{{- range $key, $value := $root.Values.otel.resourceAttributes -}}
{{- $attributes = append $attributes (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- $_ := set $settings "OTEL_RESOURCE_ATTRIBUTES" (join "," $attributes) -}}
{{- if $root.Values.otel.enabled -}}
{{- $_ := set $settings "OTEL_EXPORTER_OTLP_ENDPOINT" $root.Values.otel.endpoint -}}
{{- $_ := set $settings "OTEL_EXPORTER_OTLP_INSECURE" (ternary "true" "false" $root.Values.otel.insecure) -}}
{{- if and (not $root.Values.otel.insecure) $root.Values.otel.ca.name -}}
{{- $_ := set $settings "OTEL_EXPORTER_OTLP_CERTIFICATE" (printf "%s/%s" (include "egret.otelDir" $root) $root.Values.otel.ca.key) -}}
{{- end -}}
{{- if $root.Values.otel.samplerArg -}}
{{- $_ := set $settings "OTEL_TRACES_SAMPLER_ARG" (toString $root.Values.otel.samplerArg) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $settings "OTEL_TRACES_EXPORTER" "none" -}}
{{- end -}}
{{- toJson $settings -}}
{{- end -}}

{{/*
What a service's container is given, shared by its Deployment and its migration Job.
Arguments: dict "root" $ "workload" <item of egret.workloads> "job" <bool>.
*/}}

{{/* Environment: downward API first (referenced below as $(VAR)), then Secrets, then settings. */}}
{{- define "egret.env" -}}
{{- $root := .root -}}
{{- $w := .workload -}}
{{- $service := $w.service -}}
{{- $fullname := include "egret.fullname" $root -}}
{{- $values := index $root.Values.services $service -}}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: EGRET_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "egret.databaseSecretName" $root }}
      key: {{ include "egret.databaseKey" . }}
{{- if eq $service "query" }}
- name: EGRET_SCORE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "egret.databaseSecretName" $root }}
      key: {{ $root.Values.secrets.database.keys.scoreReadOnly }}
{{- end }}
{{- $settings := dict
  "EGRET_LISTEN_ADDRESS" (printf "0.0.0.0:%d" (int $values.port))
  "EGRET_DATA_DIR" "/var/lib/egret"
  "EGRET_MIGRATE_ON_START" (ternary "false" "true" $root.Values.migrations.enabled)
-}}
{{- $settings = merge $settings (include "egret.otelSettings" (dict "root" $root "service" $service) | fromJson) -}}
{{- /* The subject key chain: the root key where raw ids are hashed, the rotations (key ids
and secrets, docs/security.md "Rotating the subject key") everywhere, rules included. */ -}}
{{- $subjectKey := $root.Values.secrets.subjectKey -}}
{{- $_ := set $settings "EGRET_SUBJECT_KEY_ID" $subjectKey.keyId -}}
{{- if has $service (list "ingest" "score" "query") -}}
{{- $_ := set $settings "EGRET_SUBJECT_KEY_FILE" (printf "%s/%s" (include "egret.subjectKeyDir" $root) $subjectKey.key) -}}
{{- end -}}
{{- if $subjectKey.rotationsKey -}}
{{- $_ := set $settings "EGRET_SUBJECT_KEY_ROTATIONS_FILE" (printf "%s/%s" (include "egret.subjectKeyDir" $root) $subjectKey.rotationsKey) -}}
{{- end -}}
{{- /* The audit logs' MAC keys (a Secret, never the database): the migration Jobs record
their re-keying batches in the chain too. */ -}}
{{- $audit := $root.Values.secrets.auditKey -}}
{{- $_ := set $settings "EGRET_AUDIT_KEY_FILE" (printf "%s/%s" (include "egret.auditKeyDir" $root) $audit.key) -}}
{{- $_ := set $settings "EGRET_AUDIT_KEY_ID" $audit.keyId -}}
{{- if $audit.oldKeys -}}
{{- $old := list -}}
{{- range $audit.oldKeys -}}
{{- $old = append $old (printf "%s=%s/%s" .keyId (include "egret.auditKeyDir" $root) .key) -}}
{{- end -}}
{{- $_ := set $settings "EGRET_AUDIT_OLD_KEY_FILES" (join "," $old) -}}
{{- end -}}
{{- if not .job -}}
{{- /* The automatic anchors of the audit logs. */ -}}
{{- $_ := set $settings "EGRET_AUDIT_ANCHOR_FILE" (printf "%s/%s.anchors" (include "egret.auditAnchorDir" $root) $w.name) -}}
{{- $_ := set $settings "EGRET_AUDIT_ANCHOR_SECONDS" (toString $root.Values.audit.anchors.intervalSeconds) -}}
{{- /* The admin port: /metrics, /healthz and /readyz (the probes), plain HTTP. */ -}}
{{- $_ := set $settings "EGRET_ADMIN_ADDRESS" (printf "0.0.0.0:%d" (int $root.Values.metrics.port)) -}}
{{- if eq $service "ingest" -}}
{{- $_ := set $settings "EGRET_CATALOGUE_FILE" (printf "%s/catalogue/catalogue.yaml" (include "egret.configDir" $root)) -}}
{{- $shards := int $root.Values.services.rules.shards -}}
{{- if gt $shards 1 -}}
{{- $addresses := list -}}
{{- range $shard := until $shards -}}
{{- $addresses = append $addresses (printf "%s-rules-%d:%d" $fullname $shard (int $root.Values.services.rules.port)) -}}
{{- end -}}
{{- /* Shard order matters: ingest routes a subject to the shard at its index (kit/sharding.py). */ -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESSES" (join "," $addresses) -}}
{{- else -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESS" (include "egret.address" (dict "root" $root "service" "rules")) -}}
{{- end -}}
{{- end -}}
{{- if eq $service "rules" -}}
{{- $_ := set $settings "EGRET_RULESET_FILE" (printf "%s/rulesets/%s" (include "egret.configDir" $root) $root.Values.config.activeRuleset) -}}
{{- $_ := set $settings "EGRET_SCORE_ADDRESS" (include "egret.address" (dict "root" $root "service" "score")) -}}
{{- /* Backtests split reports by the catalogue's cohorts (they score with score's active policy, read from score). */ -}}
{{- $_ := set $settings "EGRET_CATALOGUE_FILE" (printf "%s/catalogue/catalogue.yaml" (include "egret.configDir" $root)) -}}
{{- end -}}
{{- if has $service (list "score" "query") -}}
{{- /* Score seeds its policy store with it at its first start; query reads it. */ -}}
{{- $_ := set $settings "EGRET_POLICY_FILE" (printf "%s/policy/policy.yaml" (include "egret.configDir" $root)) -}}
{{- end -}}
{{- if has $service (list "rules" "score" "query") -}}
{{- /* Reads of subject data state a purpose: query's reads, rules' backtests and dead letters, score's verification. */ -}}
{{- $_ := set $settings "EGRET_PURPOSES_FILE" (printf "%s/purposes/purposes.yaml" (include "egret.configDir" $root)) -}}
{{- end -}}
{{- if eq $service "query" -}}
{{- $_ := set $settings "EGRET_BENEFITS_FILE" (printf "%s/benefits/benefits.yaml" (include "egret.configDir" $root)) -}}
{{- /* Explain lists the active rule set's positive rules; every shard holds the same rule sets. */ -}}
{{- if gt (int $root.Values.services.rules.shards) 1 -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESS" (printf "%s-rules-0:%d" $fullname (int $root.Values.services.rules.port)) -}}
{{- else -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESS" (include "egret.address" (dict "root" $root "service" "rules")) -}}
{{- end -}}
{{- end -}}
{{- /* Security: serving refuses to start without these unless EGRET_INSECURE=true. */ -}}
{{- $security := $root.Values.security -}}
{{- $_ := set $settings "EGRET_RATE_LIMIT_PER_SECOND" (toString $security.rateLimit.perSecond) -}}
{{- $_ := set $settings "EGRET_RATE_LIMIT_BURST" (toString $security.rateLimit.burst) -}}
{{- if $security.insecure -}}
{{- $_ := set $settings "EGRET_INSECURE" "true" -}}
{{- else -}}
{{- $_ := set $settings "EGRET_INSECURE" "false" -}}
{{- $tls := include "egret.tlsDir" $root -}}
{{- $_ := set $settings "EGRET_TLS_CERT_FILE" (printf "%s/tls.crt" $tls) -}}
{{- $_ := set $settings "EGRET_TLS_KEY_FILE" (printf "%s/tls.key" $tls) -}}
{{- /* Verifies the other services on outgoing calls (presenting tls.crt as client certificate). */ -}}
{{- $_ := set $settings "EGRET_TLS_CA_FILE" (printf "%s/ca.crt" $tls) -}}
{{- if or (has $service (list "rules" "score")) (index $security.tls.clientAuth $service) -}}
{{- $_ := set $settings "EGRET_TLS_CLIENT_CA_FILE" (printf "%s/ca.crt" $tls) -}}
{{- end -}}
{{- $_ := set $settings "EGRET_JWT_ISSUER" $security.jwt.issuer -}}
{{- $_ := set $settings "EGRET_JWT_AUDIENCE" $security.jwt.audience -}}
{{- $_ := set $settings "EGRET_JWT_ALGORITHMS" (join "," $security.jwt.algorithms) -}}
{{- if eq $security.jwt.keys.format "url" -}}
{{- /* Fetched from the identity provider, again after the cache lifetime (docs/security.md,
"Rotation without restart"); no keys volume then. */ -}}
{{- $_ := set $settings "EGRET_JWT_JWKS_URL" $security.jwt.jwksUrl -}}
{{- $_ := set $settings "EGRET_JWT_JWKS_CACHE_S" (toString (int $security.jwt.jwksCacheSeconds)) -}}
{{- else -}}
{{- $keys := printf "%s/%s" (include "egret.jwtDir" $root) $security.jwt.keys.key -}}
{{- $_ := set $settings (ternary "EGRET_JWT_JWKS_FILE" "EGRET_JWT_PUBLIC_KEY_FILE" (eq $security.jwt.keys.format "jwks")) $keys -}}
{{- end -}}
{{- if has $service (splitList " " (include "egret.callers" $root)) -}}
{{- $_ := set $settings "EGRET_SERVICE_TOKEN_FILE" (printf "%s/%s" (include "egret.serviceTokenDir" $root) $security.serviceTokens.key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $service "rules") (ge (int $w.shard) 0) -}}
{{- $_ := set $settings "EGRET_RULES_SHARD" (toString $w.shard) -}}
{{- $_ := set $settings "EGRET_RULES_SHARDS" (toString $root.Values.services.rules.shards) -}}
{{- end -}}
{{- $settings = mergeOverwrite $settings (deepCopy $root.Values.env) (deepCopy $values.env) -}}
{{- range $name := keys $settings | sortAlpha }}
- name: {{ $name }}
  value: {{ index $settings $name | toString | quote }}
{{- end }}
{{- end -}}

{{/* Volume mounts of one container. */}}
{{- define "egret.volumeMounts" -}}
{{- $root := .root -}}
{{- $service := .workload.service -}}
{{- $config := include "egret.configDir" $root -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/egret
{{- if or (has $service (list "ingest" "score" "query")) $root.Values.secrets.subjectKey.rotationsKey }}
- name: subject-key
  mountPath: {{ include "egret.subjectKeyDir" $root }}
  readOnly: true
{{- end }}
- name: audit-key
  mountPath: {{ include "egret.auditKeyDir" $root }}
  readOnly: true
{{- if not .job }}
- name: audit-anchors
  mountPath: {{ include "egret.auditAnchorDir" $root }}
{{- include "egret.otelCaMount" $root }}
{{- if has $service (list "ingest" "rules") }}
- name: catalogue
  mountPath: {{ $config }}/catalogue
  readOnly: true
{{- end }}
{{- if eq $service "rules" }}
- name: rulesets
  mountPath: {{ $config }}/rulesets
  readOnly: true
{{- end }}
{{- if has $service (list "score" "query") }}
- name: policy
  mountPath: {{ $config }}/policy
  readOnly: true
{{- end }}
{{- if has $service (list "rules" "score" "query") }}
- name: purposes
  mountPath: {{ $config }}/purposes
  readOnly: true
{{- end }}
{{- if eq $service "query" }}
- name: benefits
  mountPath: {{ $config }}/benefits
  readOnly: true
{{- end }}
{{- if not $root.Values.security.insecure }}
- name: tls
  mountPath: {{ include "egret.tlsDir" $root }}
  readOnly: true
{{- if ne $root.Values.security.jwt.keys.format "url" }}
- name: jwt
  mountPath: {{ include "egret.jwtDir" $root }}
  readOnly: true
{{- end }}
{{- if has $service (splitList " " (include "egret.callers" $root)) }}
- name: service-token
  mountPath: {{ include "egret.serviceTokenDir" $root }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of one pod. */}}
{{- define "egret.volumes" -}}
{{- $root := .root -}}
{{- $service := .workload.service -}}
{{- $fullname := include "egret.fullname" $root -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: data
  emptyDir:
    sizeLimit: 64Mi
{{- $subjectKey := $root.Values.secrets.subjectKey }}
{{- $hashes := has $service (list "ingest" "score" "query") }}
{{- if or $hashes $subjectKey.rotationsKey }}
- name: subject-key
  secret:
    secretName: {{ include "egret.subjectKeySecretName" $root }}
    defaultMode: 0440
    items:
      {{- if $hashes }}
      - key: {{ $subjectKey.key }}
        path: {{ $subjectKey.key }}
      {{- end }}
      {{- if $subjectKey.rotationsKey }}
      - key: {{ $subjectKey.rotationsKey }}
        path: {{ $subjectKey.rotationsKey }}
      {{- end }}
{{- end }}
{{- $audit := $root.Values.secrets.auditKey }}
- name: audit-key
  secret:
    secretName: {{ include "egret.auditKeySecretName" $root }}
    defaultMode: 0440
    items:
      - key: {{ $audit.key }}
        path: {{ $audit.key }}
      {{- range $audit.oldKeys }}
      - key: {{ .key }}
        path: {{ .key }}
      {{- end }}
{{- if not .job }}
- name: audit-anchors
  {{- with $root.Values.audit.anchors.volume }}
  {{- toYaml . | nindent 2 }}
  {{- else }}
  persistentVolumeClaim:
    claimName: {{ $fullname }}-audit-anchors
  {{- end }}
{{- include "egret.otelCaVolume" $root }}
{{- if has $service (list "ingest" "rules") }}
- name: catalogue
  configMap:
    name: {{ $fullname }}-catalogue
{{- end }}
{{- if eq $service "rules" }}
- name: rulesets
  configMap:
    name: {{ $fullname }}-rulesets
{{- end }}
{{- if has $service (list "score" "query") }}
- name: policy
  configMap:
    name: {{ $fullname }}-policy
{{- end }}
{{- if has $service (list "rules" "score" "query") }}
- name: purposes
  configMap:
    name: {{ $fullname }}-purposes
{{- end }}
{{- if eq $service "query" }}
- name: benefits
  configMap:
    name: {{ $fullname }}-benefits
{{- end }}
{{- if not $root.Values.security.insecure }}
{{ include "egret.tlsVolume" (dict "root" $root "name" $service) }}
{{- $jwt := $root.Values.security.jwt.keys }}
{{- if ne $jwt.format "url" }}
- name: jwt
  {{- if eq $jwt.kind "Secret" }}
  secret:
    secretName: {{ include "egret.jwtKeysName" $root }}
  {{- else }}
  configMap:
    name: {{ include "egret.jwtKeysName" $root }}
  {{- end }}
    defaultMode: 0444
    items:
      - key: {{ $jwt.key }}
        path: {{ $jwt.key }}
{{- end }}
{{- if has $service (splitList " " (include "egret.callers" $root)) }}
- name: service-token
  secret:
    secretName: {{ include "egret.serviceTokenSecretName" (dict "root" $root "name" $service) }}
    defaultMode: 0440
    items:
      - key: {{ $root.Values.security.serviceTokens.key }}
        path: {{ $root.Values.security.serviceTokens.key }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The collector's CA, mounted when traces go to it over TLS with a CA of its own (. = root). */}}
{{- define "egret.otelCaMount" -}}
{{- if and .Values.otel.enabled (not .Values.otel.insecure) .Values.otel.ca.name }}
- name: otel-ca
  mountPath: {{ include "egret.otelDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "egret.otelCaVolume" -}}
{{- if and .Values.otel.enabled (not .Values.otel.insecure) .Values.otel.ca.name }}
{{ include "egret.keyVolume" (dict "name" "otel-ca" "source" .Values.otel.ca) }}
{{- end }}
{{- end -}}

{{/* A volume of one key of a Secret or ConfigMap (. = dict name, source: {kind, name, key}). */}}
{{- define "egret.keyVolume" -}}
- name: {{ .name }}
  {{- if eq .source.kind "Secret" }}
  secret:
    secretName: {{ .source.name }}
  {{- else }}
  configMap:
    name: {{ .source.name }}
  {{- end }}
    defaultMode: 0444
    items:
      - key: {{ .source.key }}
        path: {{ .source.key }}
{{- end -}}

{{/* A TLS Secret volume named "tls" (. = dict root, name: ingest|rules|score|query|test). */}}
{{- define "egret.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "egret.tlsSecretName" . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end -}}

{{/* The pod-level settings every Egret pod shares. */}}
{{- define "egret.podCommon" -}}
automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  {{- /* A name, or a {name: ...} object as other charts take them. */}}
  - name: {{ if kindIs "map" . }}{{ .name }}{{ else }}{{ . }}{{ end }}
  {{- end }}
{{- end }}
{{- end -}}
