{{/* The chart name, for labels. */}}
{{- define "egret.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name. */}}
{{- define "egret.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels shared by every object. */}}
{{- define "egret.labels" -}}
{{ include "egret.selectorLabels" . }}
{{ include "egret.commonLabels" . }}
{{- end -}}

{{/* The labels of every object that no selector uses. */}}
{{- define "egret.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: egret
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of the release's pods (add the component for one service). */}}
{{- define "egret.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egret.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The workloads: one per service, and one per shard for rules when rules.shards > 1.
Each item: service (ingest|rules|score|query), name (object name), shard (-1 unsharded).
Every per-workload template (Deployment, Service, PDB, HPA, migration Job) loops over this list.
*/}}
{{- define "egret.workloads" -}}
{{- $fullname := include "egret.fullname" . -}}
{{- $items := list -}}
{{- range $service := list "ingest" "rules" "score" "query" -}}
{{- $shards := 1 -}}
{{- if eq $service "rules" -}}{{- $shards = int $.Values.services.rules.shards -}}{{- end -}}
{{- if gt $shards 1 -}}
{{- range $shard := until $shards -}}
{{- $items = append $items (dict "service" $service "name" (printf "%s-%s-%d" $fullname $service $shard) "shard" $shard) -}}
{{- end -}}
{{- else -}}
{{- $items = append $items (dict "service" $service "name" (printf "%s-%s" $fullname $service) "shard" -1) -}}
{{- end -}}
{{- end -}}
{{- toJson $items -}}
{{- end -}}

{{/* Selector labels of one workload (. = dict root, workload). */}}
{{- define "egret.workloadSelectorLabels" -}}
{{ include "egret.selectorLabels" .root }}
app.kubernetes.io/component: {{ .workload.service }}
{{- if ge (int .workload.shard) 0 }}
egret.io/shard: {{ .workload.shard | quote }}
{{- end }}
{{- end -}}

{{/* The image reference. */}}
{{- define "egret.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "egret.databaseSecretName" -}}
{{- default (printf "%s-database" (include "egret.fullname" .)) .Values.secrets.database.name -}}
{{- end -}}

{{- define "egret.subjectKeySecretName" -}}
{{- default (printf "%s-subject-key" (include "egret.fullname" .)) .Values.secrets.subjectKey.name -}}
{{- end -}}

{{- define "egret.auditKeySecretName" -}}
{{- default (printf "%s-audit-key" (include "egret.fullname" .)) .Values.secrets.auditKey.name -}}
{{- end -}}

{{/* The database URL key of one workload (. = dict root, workload). */}}
{{- define "egret.databaseKey" -}}
{{- $key := index .root.Values.secrets.database.keys .workload.service -}}
{{- if ge (int .workload.shard) 0 -}}{{- printf "%s-%d" $key (int .workload.shard) -}}{{- else -}}{{- $key -}}{{- end -}}
{{- end -}}

{{/* The address of one service inside the namespace: "<name>:<port>". */}}
{{- define "egret.address" -}}
{{- printf "%s-%s:%d" (include "egret.fullname" .root) .service (int (index .root.Values.services .service).port) -}}
{{- end -}}

{{/* Mount paths, shared by the Deployments, Jobs, the test pod and docs. */}}
{{- define "egret.configDir" -}}/etc/egret{{- end -}}
{{- define "egret.subjectKeyDir" -}}/var/run/secrets/egret/subject-key{{- end -}}
{{- define "egret.tlsDir" -}}/var/run/secrets/egret/tls{{- end -}}
{{- define "egret.jwtDir" -}}/var/run/secrets/egret/jwt{{- end -}}
{{- define "egret.serviceTokenDir" -}}/var/run/secrets/egret/service-token{{- end -}}
{{- define "egret.auditKeyDir" -}}/var/run/secrets/egret/audit-key{{- end -}}
{{- define "egret.auditAnchorDir" -}}/var/lib/egret-audit{{- end -}}
{{- define "egret.otelDir" -}}/var/run/secrets/egret/otel{{- end -}}

{{/* The TLS Secret of one workload kind (. = dict root, name: ingest|rules|score|query|test). */}}
{{- define "egret.tlsSecretName" -}}
{{- default (printf "%s-%s-tls" (include "egret.fullname" .root) .name) (index .root.Values.security.tls.secretNames .name) -}}
{{- end -}}

{{/* The service-token Secret of a calling service (. = dict root, name: ingest|rules). */}}
{{- define "egret.serviceTokenSecretName" -}}
{{- default (printf "%s-%s-token" (include "egret.fullname" .root) .name) (index .root.Values.security.serviceTokens .name) -}}
{{- end -}}

{{- define "egret.jwtKeysName" -}}
{{- default (printf "%s-jwt-keys" (include "egret.fullname" .)) .Values.security.jwt.keys.name -}}
{{- end -}}

{{/* The services that call another one with a service token. */}}
{{- define "egret.callers" -}}ingest rules query{{- end -}}

{{/*
One probe of a service: the kubelet's own HTTP GET of the admin port (metrics.port, plain HTTP,
answered from its own thread). Startup and readiness ask /readyz (200 only while the database is
reachable and the service is not shutting down, what grpc.health.v1 tells clients); liveness asks
/healthz (200 while the event loop answers). No interpreter starts per check, and the gRPC
port's TLS stays out of it.
Arguments: dict "path" </readyz|/healthz> "probe" <an item of .Values.probes>.
*/}}
{{- define "egret.adminProbe" -}}
httpGet:
  path: {{ .path }}
  port: admin
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end -}}

{{/*
The chart's relabeling of every scrape (ServiceMonitor and PodMonitor alike): `job` is
"<fullname>-<service>", one job per service whatever scrapes it and however rules is sharded.
The alerts (prometheusrule.yaml) and the dashboard select by it.
*/}}
{{- define "egret.metricsRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
  targetLabel: job
  replacement: {{ include "egret.fullname" . }}-$1
{{- end -}}

{{/* The series of this release's four services, as PromQL label matchers. */}}
{{- define "egret.metricsSelector" -}}
namespace="{{ .Release.Namespace }}", job=~"{{ include "egret.fullname" . }}-(ingest|rules|score|query)"
{{- end -}}

{{/* The labels of one alert (. = dict severity, rule: .Values.metrics.prometheusRule). */}}
{{- define "egret.alertLabels" -}}
{{- toYaml (merge (dict "severity" .severity) .rule.alertLabels) -}}
{{- end -}}

{{/* Fails rendering on values the schema cannot express. */}}
{{- define "egret.validate" -}}
{{- $rules := .Values.services.rules -}}
{{- if or (gt (int $rules.replicas) 1) $rules.autoscaling.enabled -}}
{{- fail "services.rules: scale rules with services.rules.shards, not replicas or autoscaling (a rules instance keeps per-subject state)" -}}
{{- end -}}
{{- if not (hasKey .Values.config.rulesets .Values.config.activeRuleset) -}}
{{- if or .Values.config.rulesets (ne .Values.config.activeRuleset "sample.yaml") -}}
{{- fail (printf "config.activeRuleset %q is not a key of config.rulesets" .Values.config.activeRuleset) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.secrets.create (not .Values.secrets.subjectKey.value) -}}
{{- fail "secrets.create needs secrets.subjectKey.value (at least 32 bytes)" -}}
{{- end -}}
{{- if and .Values.secrets.create (not .Values.secrets.auditKey.value) -}}
{{- fail "secrets.create needs secrets.auditKey.value (at least 32 bytes)" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics: enable serviceMonitor or podMonitor, not both (Prometheus would scrape every pod twice)" -}}
{{- end -}}
{{- $database := .Values.networkPolicy.database -}}
{{- if and .Values.networkPolicy.enabled (not $database.cidrs) (not $database.to) -}}
{{- fail "networkPolicy.database: name the database's addresses (cidrs) or peers (to); both empty would let every pod reach any address on the database ports" -}}
{{- end -}}
{{- end -}}

{{/* The egress rule every Egret pod needs: DNS. */}}
{{- define "egret.egressDns" -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    - port: {{ $np.dns.port }}
      protocol: UDP
    - port: {{ $np.dns.port }}
      protocol: TCP
  to:
    {{- toYaml $np.dns.to | nindent 4 }}
{{- end -}}

{{/* The egress rule to the OpenTelemetry collector, when traces are exported. */}}
{{- define "egret.egressOtel" -}}
{{- if .Values.otel.enabled -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    {{- range $np.otelCollector.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.otelCollector.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/*
The egress rule to the identity provider (networkPolicy.identityProvider): the portal's sign-in,
and the services' JWKS with security.jwt.keys.format url. Refuses to render with neither
addresses nor peers, which would mean any address on its ports.
*/}}
{{- define "egret.egressIdentityProvider" -}}
{{- $idp := .Values.networkPolicy.identityProvider -}}
{{- if and (not $idp.cidrs) (not $idp.to) -}}
{{- fail "networkPolicy.identityProvider: name the identity provider's addresses (cidrs) or peers (to); both empty would let the portal and the services reach any address on its ports" -}}
{{- end -}}
- ports:
    {{- range $idp.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  to:
    {{- range $idp.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- with $idp.to }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* Egress rules every Egret service pod needs: DNS, and PostgreSQL. */}}
{{- define "egret.egressDnsAndDatabase" -}}
{{- $np := .Values.networkPolicy -}}
{{ include "egret.egressDns" . }}
- ports:
    {{- range $np.database.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  # Only the configured database addresses (egret.validate refuses an empty list).
  to:
    {{- range $np.database.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- with $np.database.to }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The portal (templates/portal/): its object name, Secrets, public host and mount paths. */}}
{{- define "egret.portalName" -}}
{{- printf "%s-portal" (include "egret.fullname" .) -}}
{{- end -}}

{{- define "egret.portalOidcSecretName" -}}
{{- default (printf "%s-portal-oidc" (include "egret.fullname" .)) .Values.secrets.portal.oidcClientSecret.name -}}
{{- end -}}

{{- define "egret.portalSessionSecretName" -}}
{{- default (printf "%s-portal-session" (include "egret.fullname" .)) .Values.secrets.portal.sessionSecret.name -}}
{{- end -}}

{{/* The identity provider the portal signs people in with: by default the services' token issuer. */}}
{{- define "egret.portalIssuer" -}}
{{- default .Values.security.jwt.issuer .Values.portal.oidc.issuer | trimSuffix "/" -}}
{{- end -}}

{{/* The host of portal.publicUrl, which the Ingress and the HTTPRoute serve. */}}
{{- define "egret.portalHost" -}}
{{- (urlParse .Values.portal.publicUrl).hostname -}}
{{- end -}}

{{- define "egret.portalOidcDir" -}}/var/run/secrets/egret/portal-oidc{{- end -}}
{{- define "egret.portalSessionDir" -}}/var/run/secrets/egret/portal-session{{- end -}}
{{- define "egret.portalOidcCaDir" -}}/var/run/secrets/egret/portal-oidc-ca{{- end -}}

{{/* Fails rendering on portal values the schema cannot express. */}}
{{- define "egret.validatePortal" -}}
{{- $portal := .Values.portal -}}
{{- if $portal.enabled -}}
{{- $secrets := .Values.secrets.portal -}}
{{- if and .Values.secrets.create (not $secrets.oidcClientSecret.value) -}}
{{- fail "secrets.create with portal.enabled needs secrets.portal.oidcClientSecret.value" -}}
{{- end -}}
{{- if .Values.secrets.create -}}
{{- range $line := splitList "\n" $secrets.sessionSecret.value -}}
{{- if and (trim $line) (lt (len (trim $line)) 32) -}}
{{- fail "secrets.portal.sessionSecret.value: every session key must be at least 32 bytes" -}}
{{- end -}}
{{- end -}}
{{- if not (trim $secrets.sessionSecret.value) -}}
{{- fail "secrets.create with portal.enabled needs secrets.portal.sessionSecret.value (at least 32 bytes)" -}}
{{- end -}}
{{- end -}}
{{- if and $portal.httpRoute.enabled (not $portal.httpRoute.parentRefs) -}}
{{- fail "portal.httpRoute.parentRefs: name the Gateway the HTTPRoute attaches to" -}}
{{- end -}}
{{- end -}}
{{- end -}}
