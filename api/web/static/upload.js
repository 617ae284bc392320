// Upload page: pick or drop files, check them locally, send each to POST /api/v1/jobs with progress.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form) { return; }
  var input = document.getElementById("f-files");
  var zone = document.getElementById("dropzone");
  var list = document.getElementById("upload-list");
  var maxBytes = parseInt(form.dataset.maxBytes, 10);
  var pending = [];

  function cookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) { return decodeURIComponent(parts[i].slice(eq + 1)); }
    }
    return "";
  }

  function mb(n) {
    if (n < 1024 * 1024) { return Math.max(1, Math.round(n / 1024)) + " KB"; }
    return (n / (1024 * 1024)).toFixed(1) + " MB";
  }

  // A summary under the file field, so a refusal is announced where the user is looking.
  var refused = [];
  function fieldError(text) {
    var box = document.getElementById("e-files");
    if (!box) {
      box = document.createElement("p");
      box.id = "e-files";
      box.className = "field-error";
      box.setAttribute("role", "alert");
      input.parentNode.appendChild(box);
      input.setAttribute("aria-describedby", "files-hint e-files");
    }
    refused.push(text);
    box.textContent = refused.length === 1 ? refused[0] : refused.length + " files were not sent: " + refused.join(" ");
    input.setAttribute("aria-invalid", "true");
  }

  // Magic bytes only, like the server: the extension and the browser's type are not trusted.
  function sniff(file) {
    return file.slice(0, 132).arrayBuffer().then(function (buf) {
      var b = new Uint8Array(buf);
      if (b.length >= 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) { return "png"; }
      if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) { return "jpeg"; }
      if (b.length >= 132 && b[128] === 0x44 && b[129] === 0x49 && b[130] === 0x43 && b[131] === 0x4d) { return "dicom"; }
      return null;
    });
  }

  function row(file) {
    var li = document.createElement("li");
    var name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name + " (" + mb(file.size) + ")";
    var state = document.createElement("span");
    state.className = "state";
    state.textContent = "waiting";
    var bar = document.createElement("progress");
    bar.max = 100; bar.value = 0;
    bar.setAttribute("aria-label", "Upload progress of " + file.name);
    li.appendChild(name); li.appendChild(state); li.appendChild(bar);
    list.appendChild(li);
    return { li: li, state: state, bar: bar };
  }

  function fail(r, message, file) {
    if (file) { fieldError(file.name + ": " + message); }
    r.state.className = "state error";
    r.state.textContent = message;
    r.li.classList.add("error");
    r.bar.remove();
  }

  // A page view renews an expired access cookie from the refresh cookie (see api/web/auth.py).
  function renewSession() {
    return fetch(window.location.href, { credentials: "same-origin" }).then(function (resp) {
      return resp.ok && !resp.redirected;
    }).catch(function () { return false; });
  }

  function send(file, r, retried) {
    return new Promise(function (resolve) {
      var xhr = new XMLHttpRequest();
      var data = new FormData();
      data.append("file", file, file.name);
      xhr.open("POST", form.dataset.api);
      xhr.setRequestHeader(form.dataset.csrfHeader, cookie(form.dataset.csrfCookie));
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) { r.bar.value = Math.round(100 * e.loaded / e.total); r.state.textContent = r.bar.value + "%"; }
      });
      xhr.addEventListener("load", function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = null; }
        if ((xhr.status === 202 || xhr.status === 200) && body && body.id) {
          r.bar.value = 100;
          r.state.className = "state done";
          r.state.textContent = "";
          var a = document.createElement("a");
          a.href = form.dataset.jobUrl.replace("JOB_ID", body.id);
          a.textContent = "View job (" + body.status + ")";
          a.className = "job-link";
          r.state.appendChild(a);
          resolve();
        } else if (xhr.status === 401 && !retried) {
          r.state.textContent = "renewing session";
          renewSession().then(function (ok) {
            if (ok) { send(file, r, true).then(resolve); return; }
            fail(r, "Your session has expired. Log in again, then retry.", file);
            resolve();
          });
        } else {
          if (xhr.status === 401) {
            fail(r, "Your session has expired. Log in again, then retry.", file);
          } else if (xhr.status === 413) {
            fail(r, "File too large: the limit is " + mb(maxBytes) + ".", file);
          } else {
            fail(r, (body && body.error && body.error.message) || ("Upload failed (HTTP " + xhr.status + ")."), file);
          }
          resolve();
        }
      });
      xhr.addEventListener("error", function () { fail(r, "Network error: the file was not sent.", file); resolve(); });
      xhr.send(data);
    });
  }

  function addFiles(files) {
    for (var i = 0; i < files.length; i++) { pending.push(files[i]); }
    start();
  }

  var busy = false;
  function start() {
    if (busy) { return; }
    busy = true;
    (function next() {
      var file = pending.shift();
      if (!file) { busy = false; input.value = ""; return; }
      var r = row(file);
      if (file.size > maxBytes) {
        fail(r, "File too large: " + mb(file.size) + " is over the " + mb(maxBytes) + " limit.", file);
        next();
        return;
      }
      if (file.size === 0) { fail(r, "The file is empty.", file); next(); return; }
      sniff(file).then(function (kind) {
        if (!kind) {
          fail(r, "Not an image: only PNG, JPEG and DICOM files are accepted.", file);
          return null;
        }
        r.state.textContent = "uploading";
        return send(file, r);
      }).then(next);
    })();
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    if (input.files && input.files.length) { addFiles(input.files); }
  });
  input.addEventListener("change", function () {
    if (input.files && input.files.length) { addFiles(input.files); }
  });
  ["dragenter", "dragover"].forEach(function (t) {
    zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (e) {
    if (e.dataTransfer && e.dataTransfer.files) { addFiles(e.dataTransfer.files); }
  });
})();
