#!/usr/bin/env bash
# Smoke-test every route of a running moondream-server with curl.
#
#   BASE_URL   server to test              (default http://127.0.0.1:8001)
#   API_KEY    key to send, if the server has keys; then the 401 cases are checked too
#   IMAGE      image file to upload        (default: the tiny test image in this repo,
#                                           else a small built-in PNG)
#   SETTINGS   sampling settings JSON      (default {"temperature": 0, "max_tokens": 16})
#
# Exits non-zero at the first unexpected status or body, printing what came back.
set -euo pipefail

BASE_URL="${BASE_URL:-http://127.0.0.1:8001}"
BASE_URL="${BASE_URL%/}"
API_KEY="${API_KEY:-}"
DEFAULT_SETTINGS='{"temperature": 0, "max_tokens": 16}'
SETTINGS="${SETTINGS:-$DEFAULT_SETTINGS}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [[ -n "${IMAGE:-}" ]]; then
    cp "$IMAGE" "$TMP/image"
elif [[ -f "$HERE/tests/fixtures/moondream2-tiny/images/img1.png" ]]; then
    cp "$HERE/tests/fixtures/moondream2-tiny/images/img1.png" "$TMP/image"
else
    # 16x16 RGB PNG (a colour gradient).
    printf '%s' 'iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAHUlEQVR42mNkYGgQYGAgHrEwCDCQBEY1jGoYOhoAHgoCnoxpJwYAAAAASUVORK5CYII=' |
        base64 -d >"$TMP/image"
fi
B64="$(base64 <"$TMP/image" | tr -d '\n')"
URL="data:image/png;base64,$B64"

AUTH=()
if [[ -n "$API_KEY" ]]; then
    AUTH=(-H "X-Moondream-Auth: $API_KEY")
fi

PASSED=0

# check EXPECTED_STATUS NAME [GREP_PATTERN] -- CURL_ARGS...
check() {
    local expected="$1" name="$2" pattern="$3"
    shift 4
    local status
    status="$(curl -sS -o "$TMP/body" -w '%{http_code}' --max-time 300 "$@")" || {
        echo "FAIL $name: curl could not complete the request" >&2
        exit 1
    }
    if [[ "$status" != "$expected" ]]; then
        echo "FAIL $name: expected HTTP $expected, got $status" >&2
        head -c 2000 "$TMP/body" >&2
        echo >&2
        exit 1
    fi
    if [[ -n "$pattern" ]] && ! grep -q -- "$pattern" "$TMP/body"; then
        echo "FAIL $name: HTTP $status but the body lacks '$pattern'" >&2
        head -c 2000 "$TMP/body" >&2
        echo >&2
        exit 1
    fi
    PASSED=$((PASSED + 1))
    echo "ok   $name ($status)"
}

# json NAME BODY: write a JSON request body to a file (the image makes it too big for argv)
json() {
    printf '%s' "$2" >"$TMP/$1.json"
    echo "$TMP/$1.json"
}

# req PATH BODYFILE: the curl arguments of a JSON POST, in the array REQ
req() {
    REQ=(-X POST "$BASE_URL$1" -H "Content-Type: application/json" --data-binary "@$2")
}

J_CAPTION="$(json caption "{\"image_url\": \"$URL\", \"length\": \"normal\", \"settings\": $SETTINGS}")"
J_CAPTION_S="$(json caption_s "{\"image_url\": \"$URL\", \"length\": \"short\", \"stream\": true, \"settings\": $SETTINGS}")"
J_QUERY="$(json query "{\"image_url\": \"$URL\", \"question\": \"What is in this image?\", \"settings\": $SETTINGS}")"
J_QUERY_S="$(json query_s "{\"image_url\": \"$URL\", \"question\": \"What is this?\", \"stream\": true, \"settings\": $SETTINGS}")"
J_QUERY_R="$(json query_r "{\"image_url\": \"$URL\", \"question\": \"What is this?\", \"reasoning\": true, \"settings\": $SETTINGS}")"
J_QUERY_T="$(json query_t "{\"question\": \"Say hello.\", \"settings\": $SETTINGS}")"
J_QUERY_REFS="$(json query_refs "{\"image_url\": \"$URL\", \"question\": \"What is here?\", \"spatial_refs\": [[0.5, 0.5]], \"settings\": $SETTINGS}")"
J_DETECT="$(json detect "{\"image_url\": \"$URL\", \"object\": \"cat\", \"settings\": {\"max_objects\": 4}}")"
J_POINT="$(json point "{\"image_url\": \"$URL\", \"object\": \"cat\", \"settings\": {\"max_objects\": 4}}")"
S_CAPTION="$(json s_caption "{\"image\": \"$URL\", \"settings\": $SETTINGS}")"
S_CAPTION_S="$(json s_caption_s "{\"image\": \"$URL\", \"stream\": true, \"settings\": $SETTINGS}")"
S_QUERY="$(json s_query "{\"image\": \"$URL\", \"question\": \"What is in this image?\", \"settings\": $SETTINGS}")"
S_DETECT="$(json s_detect "{\"image\": \"$URL\", \"object\": \"cat\", \"settings\": {\"max_objects\": 4}}")"
S_POINT="$(json s_point "{\"image\": \"$URL\", \"object\": \"cat\", \"settings\": {\"max_objects\": 4}}")"
O_CHAT="$(json o_chat "{\"model\": \"moondream2\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"What is this?\"}, {\"type\": \"image_url\", \"image_url\": {\"url\": \"$URL\"}}]}]}")"
O_CHAT_S="$(json o_chat_s "{\"model\": \"moondream2\", \"max_tokens\": 8, \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"What is this?\"}, {\"type\": \"image_url\", \"image_url\": {\"url\": \"$URL\"}}]}]}")"
O_OTHER="$(json o_other "{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}")"
L_CHAT="$(json l_chat "{\"model\": \"moondream2\", \"stream\": false, \"options\": {\"num_predict\": 8}, \"messages\": [{\"role\": \"user\", \"content\": \"What is this?\", \"images\": [\"$B64\"]}]}")"
L_CHAT_S="$(json l_chat_s "{\"model\": \"moondream2\", \"options\": {\"num_predict\": 8}, \"messages\": [{\"role\": \"user\", \"content\": \"What is this?\", \"images\": [\"$B64\"]}]}")"
L_GENERATE="$(json l_generate "{\"model\": \"moondream2\", \"stream\": false, \"options\": {\"num_predict\": 8}, \"prompt\": \"What is this?\", \"images\": [\"$B64\"]}")"
L_SHOW="$(json l_show "{\"model\": \"moondream2\"}")"
BAD_B64="$(json bad_b64 "{\"image_url\": \"data:image/png;base64,@@not-base64@@\"}")"
NOT_IMAGE="$(json not_image "{\"image_url\": \"data:image/png;base64,aGVsbG8gd29ybGQ=\"}")"
MISSING="$(json missing "{\"length\": \"short\"}")"
BAD_REFS="$(json bad_refs "{\"image_url\": \"$URL\", \"question\": \"q\", \"spatial_refs\": [[0.9, 0.9, 0.1, 0.1]]}")"

echo "testing $BASE_URL"

# --- health and docs (always open)
check 200 "GET /health" '"status"' -- "$BASE_URL/health"
check 200 "GET /v1/health" '"model"' -- "$BASE_URL/v1/health"
check 200 "GET /health/ready" '"ready":true' -- "$BASE_URL/health/ready"
check 200 "GET /docs" 'swagger' -- "$BASE_URL/docs"
check 200 "GET /redoc" 'redoc' -- "$BASE_URL/redoc"
check 200 "GET /openapi.json" '"/v1/caption"' -- "$BASE_URL/openapi.json"

# --- cloud-compatible routes
req /v1/caption "$J_CAPTION"
check 200 "POST /v1/caption" '"caption"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1//caption "$J_CAPTION"
check 200 "POST /v1//caption (double slash)" '"caption"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/caption "$J_CAPTION_S"
check 200 "POST /v1/caption stream" '"completed": true' -- "${REQ[@]}" -N "${AUTH[@]}"
req /v1/query "$J_QUERY"
check 200 "POST /v1/query" '"answer"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/query "$J_QUERY_S"
check 200 "POST /v1/query stream" '"completed": true' -- "${REQ[@]}" -N "${AUTH[@]}"
req /v1/query "$J_QUERY_R"
check 200 "POST /v1/query reasoning" '"reasoning"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/query "$J_QUERY_T"
check 200 "POST /v1/query text-only" '"answer"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/query "$J_QUERY_REFS"
check 200 "POST /v1/query spatial_refs" '"answer"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/detect "$J_DETECT"
check 200 "POST /v1/detect" '"objects"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/point "$J_POINT"
check 200 "POST /v1/point" '"points"' -- "${REQ[@]}" "${AUTH[@]}"

req /v1/segment "$J_DETECT"
check 501 "POST /v1/segment -> 501 (no such skill in Moondream2)" '"skill_not_available"' -- "${REQ[@]}" "${AUTH[@]}"

# --- OpenAI-compatible routes
BEARER=()
if [[ -n "$API_KEY" ]]; then
    BEARER=(-H "Authorization: Bearer $API_KEY")
fi
check 200 "GET /v1/models" '"moondream2"' -- "$BASE_URL/v1/models" "${BEARER[@]}"
req /v1/chat/completions "$O_CHAT"
check 200 "POST /v1/chat/completions" '"chat.completion"' -- "${REQ[@]}" "${BEARER[@]}"
req /v1/chat/completions "$O_CHAT_S"
check 200 "POST /v1/chat/completions stream" 'data: \[DONE\]' -- "${REQ[@]}" -N "${BEARER[@]}"
req /v1/chat/completions "$O_OTHER"
check 404 "another model -> 404" '"model_not_found"' -- "${REQ[@]}" "${BEARER[@]}"

# --- Ollama-compatible routes
req /api/chat "$L_CHAT"
check 200 "POST /api/chat" '"done":true' -- "${REQ[@]}" "${BEARER[@]}"
req /api/chat "$L_CHAT_S"
check 200 "POST /api/chat stream (the default)" '"done": true' -- "${REQ[@]}" -N "${BEARER[@]}"
req /api/generate "$L_GENERATE"
check 200 "POST /api/generate" '"response"' -- "${REQ[@]}" "${BEARER[@]}"
check 200 "GET /api/tags" '"moondream2:latest"' -- "$BASE_URL/api/tags" "${BEARER[@]}"
req /api/show "$L_SHOW"
check 200 "POST /api/show" '"vision"' -- "${REQ[@]}" "${BEARER[@]}"
check 200 "GET /api/version" '"version"' -- "$BASE_URL/api/version" "${BEARER[@]}"

# --- seed routes (JSON)
req /caption "$S_CAPTION"
check 200 "POST /caption" '"status":"success"' -- "${REQ[@]}" "${AUTH[@]}"
req /caption "$S_CAPTION_S"
check 200 "POST /caption stream" '"completed": true' -- "${REQ[@]}" -N "${AUTH[@]}"
req /query "$S_QUERY"
check 200 "POST /query" '"answer"' -- "${REQ[@]}" "${AUTH[@]}"
req /detect "$S_DETECT"
check 200 "POST /detect" '"detections"' -- "${REQ[@]}" "${AUTH[@]}"
req /point "$S_POINT"
check 200 "POST /point" '"coordinates"' -- "${REQ[@]}" "${AUTH[@]}"

# --- seed routes (multipart)
F=(-F "file=@$TMP/image;type=image/png")
check 200 "POST /upload/caption" '"caption"' -- -X POST "$BASE_URL/upload/caption" "${F[@]}" \
    -F "length=short" -F "settings=$SETTINGS" "${AUTH[@]}"
check 200 "POST /upload/caption stream" '"completed": true' -- -X POST "$BASE_URL/upload/caption" "${F[@]}" \
    -F "stream=true" -F "settings=$SETTINGS" -N "${AUTH[@]}"
check 200 "POST /upload/query" '"answer"' -- -X POST "$BASE_URL/upload/query" "${F[@]}" \
    -F "question=What is in this image?" -F "settings=$SETTINGS" "${AUTH[@]}"
check 200 "POST /upload/detect" '"detections"' -- -X POST "$BASE_URL/upload/detect" "${F[@]}" \
    -F "object=cat" -F 'settings={"max_objects": 4}' "${AUTH[@]}"
check 200 "POST /upload/point" '"coordinates"' -- -X POST "$BASE_URL/upload/point" "${F[@]}" \
    -F "object=cat" -F 'settings={"max_objects": 4}' "${AUTH[@]}"

# --- errors that must be real statuses
req /v1/caption "$BAD_B64"
check 400 "bad base64 -> 400" '"error"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/caption "$NOT_IMAGE"
check 400 "not an image -> 400" '"error"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/query "$BAD_REFS"
check 400 "inverted spatial_refs box -> 400" '"error"' -- "${REQ[@]}" "${AUTH[@]}"
req /v1/caption "$MISSING"
check 422 "missing image_url -> 422" '"error"' -- "${REQ[@]}" "${AUTH[@]}"
req /caption "$MISSING"
check 422 "missing image (seed) -> 422" '"detail"' -- "${REQ[@]}" "${AUTH[@]}"
check 404 "unknown route -> 404" '"error"' -- -X POST "$BASE_URL/v1/nope" "${AUTH[@]}"

if [[ -n "$API_KEY" ]]; then
    req /v1/caption "$J_CAPTION"
    check 401 "no key -> 401" '"error"' -- "${REQ[@]}"
    req /v1/query "$J_QUERY_T"
    check 401 "wrong key -> 401" '"error"' -- "${REQ[@]}" -H "X-Moondream-Auth: wrong-$API_KEY"
    req /caption "$S_CAPTION"
    check 401 "no key (seed) -> 401" '"detail"' -- "${REQ[@]}"
fi

echo "all $PASSED checks passed"
