{{/*
The extension points platform teams set (values.yaml, "Extension points"): the chart-wide keys
apply to every pod, Service and ServiceAccount, and a component's keys of the same name refine
them. Maps merge (the component wins on a clash), lists append (the chart-wide items first), and
affinity, topologySpreadConstraints and priorityClassName are replaced when the component sets them.
*/}}

{{/*
One key resolved over layers of values, from the chart-wide values to the most specific component,
as JSON {"v": result} (. = dict "layers" <list of value maps> "key" <name> "replace" <bool>).
*/}}
{{- define "egret.layered" -}}
{{- $result := dict -}}
{{- $list := list -}}
{{- $last := "" -}}
{{- range $layer := .layers -}}
{{- $value := index $layer $.key -}}
{{- if kindIs "map" $value -}}
{{- $result = mergeOverwrite $result (deepCopy $value) -}}
{{- else if kindIs "slice" $value -}}
{{- $list = concat $list $value -}}
{{- end -}}
{{- if $value -}}
{{- $last = $value -}}
{{- end -}}
{{- end -}}
{{- if .replace -}}
{{- toJson (dict "v" $last) -}}
{{- else if $list -}}
{{- toJson (dict "v" $list) -}}
{{- else -}}
{{- toJson (dict "v" $result) -}}
{{- end -}}
{{- end -}}

{{/* A map or list key as YAML at the current indentation, empty when empty (. = as egret.layered). */}}
{{- define "egret.layeredYaml" -}}
{{- with (include "egret.layered" . | fromJson).v -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}

{{/*
Where a pod runs: priorityClassName, nodeSelector, tolerations, affinity, and topology spread
constraints (. = dict "layers" <list> "spread" <bool> "selector" <workloadSelectorLabels args>).
With spread and none given, pods spread over nodes and zones (best effort).
*/}}
{{- define "egret.podScheduling" -}}
{{- $layers := .layers -}}
{{- with (include "egret.layered" (dict "layers" $layers "key" "priorityClassName" "replace" true) | fromJson).v }}
priorityClassName: {{ . }}
{{- end }}
{{- with include "egret.layeredYaml" (dict "layers" $layers "key" "nodeSelector") }}
nodeSelector:
  {{- . | nindent 2 }}
{{- end }}
{{- with include "egret.layeredYaml" (dict "layers" $layers "key" "tolerations") }}
tolerations:
  {{- . | nindent 2 }}
{{- end }}
{{- with (include "egret.layered" (dict "layers" $layers "key" "affinity" "replace" true) | fromJson).v }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .spread }}
topologySpreadConstraints:
  {{- with (include "egret.layered" (dict "layers" $layers "key" "topologySpreadConstraints" "replace" true) | fromJson).v }}
  {{- toYaml . | nindent 2 }}
  {{- else }}
  {{- range $topologyKey := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
  - maxSkew: 1
    topologyKey: {{ $topologyKey }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "egret.workloadSelectorLabels" $.selector | nindent 8 }}
  {{- end }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The serviceAccount blocks of the layers, as layers themselves (. = list of value maps). */}}
{{- define "egret.serviceAccountLayers" -}}
{{- $accounts := list -}}
{{- range . -}}
{{- $accounts = append $accounts (index . "serviceAccount" | default dict) -}}
{{- end -}}
{{- toJson $accounts -}}
{{- end -}}
