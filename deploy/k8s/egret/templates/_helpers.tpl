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

{{/* The database URL key of one workload (. = dict root, workload). */}}
{{- define "egret.databaseKey" -}}
{{- $key := index .root.Values.secrets.database.keys .workload.service -}}
{{- if ge (int .workload.shard) 0 -}}{{- printf "%s-%d" $key (int .workload.shard) -}}{{- else -}}{{- $key -}}{{- end -}}
{{- end -}}

{{/* The address of one service inside the namespace: "<name>:<port>". */}}
{{- define "egret.address" -}}
{{- printf "%s-%s:%d" (include "egret.fullname" .root) .service (int (index .root.Values.services .service).port) -}}
{{- end -}}

{{/* Mount paths, shared by the Deployments, Jobs and docs. */}}
{{- define "egret.configDir" -}}/etc/egret{{- end -}}
{{- define "egret.subjectKeyDir" -}}/var/run/secrets/egret/subject-key{{- end -}}

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
{{- if and .Values.secrets.tls.enabled (not .Values.secrets.tls.name) -}}
{{- fail "secrets.tls.enabled needs secrets.tls.name" -}}
{{- end -}}
{{- if and .Values.secrets.jwt.enabled (not .Values.secrets.jwt.name) -}}
{{- fail "secrets.jwt.enabled needs secrets.jwt.name" -}}
{{- end -}}
{{- end -}}

{{/* Egress rules every Egret pod needs: DNS, and PostgreSQL. */}}
{{- define "egret.egressDnsAndDatabase" -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    - port: {{ $np.dns.port }}
      protocol: UDP
    - port: {{ $np.dns.port }}
      protocol: TCP
  to:
    {{- toYaml $np.dns.to | nindent 4 }}
- ports:
    {{- range $np.database.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.database.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
