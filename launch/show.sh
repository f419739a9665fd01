# Sourced by the launch scripts (not run on its own).
# show WORD...: print a command so that it can be pasted into a shell (words quoted only when needed).
show() {
  local out=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
